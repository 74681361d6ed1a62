// The audit's building blocks: one check's running result, keyset paging within a budget, and calls to
// many objects with bounded concurrency.

export type CheckName = "wallet" | "coupons" | "stock" | "orders" | "exports";

/** One offending row, named by its id and the numbers that disagree. */
export type Sample = Record<string, string | number | null>;

/** Per shard, in shard order; null where the shard was not live or did not answer. */
type PerShard = (number | null)[];

/** One sharded coupon's gates, as the coupons check lists them (docs/sharded-coupons.md). */
export interface ShardedCouponFigures {
  couponId: number;
  shards: number;
  /** D1's issued_count. */
  issuedCount: number;
  /** What the audit made of the shards together. */
  gate: "agrees" | "disagrees" | "busy" | "idle" | "unreachable";
  issued: PerShard;
  quota: PerShard;
  pending: PerShard;
  requests: PerShard;
  transfersGiven: PerShard;
  piecesGiven: PerShard;
  openIntents: PerShard;
}

/** A count, or the coupons check's `shardedCoupons`: figures that are reported, not judged. */
export type Detail = number | ShardedCouponFigures[];

export interface CheckResult {
  name: CheckName;
  ok: boolean;
  /** Rows of the check's table examined (users, coupons, products, orders, exports). */
  checked: number;
  violations: number;
  /** Up to MAX_SAMPLES of the violations. */
  samples: Sample[];
  /**
   * Reported, not judged: counts (objects skipped while busy, failed exports, rows not reached) and, for the
   * coupons check, `shardedCoupons`: the figures of each shard of the first sharded coupons.
   */
  details: Record<string, Detail>;
}

export const MAX_SAMPLES = 10;
/** Sharded coupons whose shards' figures the coupons check lists, the first it asked by id. */
export const MAX_SHARDED_FIGURES = 20;

export interface AuditLimits {
  /** Rows per keyset page; each page is one D1 query. */
  pageSize: number;
  /**
   * Pages per check per call. D1 allows 1,000 queries per Worker invocation (Workers Paid): five checks
   * of 150 pages, plus a few confirmations, stay under it. Rows past the last page are counted, not checked.
   */
  maxPages: number;
  /** Objects (stock objects, coupon gates) asked per check per call; the rest are counted as not asked. */
  maxObjects: number;
  /** Object calls in flight at once. */
  concurrency: number;
  /** An object that does not answer within this long is counted unreachable. */
  objectTimeoutMs: number;
  /** Before each re-check of an object that disagreed with D1: a disagreement is reported only if it lasts. */
  confirmDelaysMs: number[];
}

export const DEFAULT_LIMITS: AuditLimits = {
  pageSize: 1_000,
  maxPages: 150,
  maxObjects: 1_000,
  concurrency: 16,
  objectTimeoutMs: 5_000,
  confirmDelaysMs: [250, 1_000],
};

export class Check {
  checked = 0;
  violations = 0;
  private readonly samples: Sample[] = [];
  private readonly counts: Record<string, number> = {};
  private readonly shardedCoupons: ShardedCouponFigures[] = [];

  constructor(readonly name: CheckName) {}

  violation(sample: Sample): void {
    this.violations += 1;
    if (this.samples.length < MAX_SAMPLES) this.samples.push(sample);
  }

  count(detail: string, n = 1): void {
    this.counts[detail] = (this.counts[detail] ?? 0) + n;
  }

  /** Lists a sharded coupon's figures (the caller bounds the list). */
  listShardedCoupon(figures: ShardedCouponFigures): void {
    this.shardedCoupons.push(figures);
  }

  result(): CheckResult {
    return {
      name: this.name,
      ok: this.violations === 0,
      checked: this.checked,
      violations: this.violations,
      samples: this.samples,
      details: this.shardedCoupons.length > 0 ? { ...this.counts, shardedCoupons: this.shardedCoupons } : { ...this.counts },
    };
  }
}

export interface PageRead {
  /** Rows of the paged table in this page (the keyset's table, not necessarily the rows checked). */
  size: number;
  lastId: number | null;
}

/**
 * Walks a table by id, `pageSize` rows per `readPage` call, for at most `maxPages` pages. Returns null once
 * the table is done, or the last id reached when the budget ran out first.
 */
export async function walkPages(limits: AuditLimits, readPage: (afterId: number, limit: number) => Promise<PageRead>): Promise<number | null> {
  let afterId = 0;
  for (let page = 0; page < limits.maxPages; page++) {
    const { size, lastId } = await readPage(afterId, limits.pageSize);
    if (size < limits.pageSize || lastId === null) return null;
    afterId = lastId;
  }
  return afterId;
}

/** Runs `fn` over `items`, at most `concurrency` at a time. */
export async function forEachBounded<T>(items: T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
}

/** Runs the calls given to it, at most `concurrency` at once; the others wait their turn, in order. */
export function limiter(concurrency: number): <T>(call: () => Promise<T>) => Promise<T> {
  let running = 0;
  const waiting: (() => void)[] = [];
  return async (call) => {
    // A finished call hands its slot straight to the next waiting one.
    if (running < concurrency) running++;
    else await new Promise<void>((resolve) => waiting.push(resolve));
    try {
      return await call();
    } finally {
      const next = waiting.shift();
      if (next) next();
      else running--;
    }
  };
}

type PagedTable = "users" | "coupons" | "products" | "order_exports";

/** Counts, as `notReached`, the rows of `table` past `stoppedAfter` (walkPages' answer; null: none). */
export async function reportNotReached(check: Check, db: D1Database, table: PagedTable, stoppedAfter: number | null): Promise<void> {
  if (stoppedAfter === null) return;
  const row = await db.prepare(`SELECT count(*) AS n FROM ${table} WHERE id > ?`).bind(stoppedAfter).first<{ n: number }>();
  if (row && row.n > 0) check.count("notReached", row.n);
}
