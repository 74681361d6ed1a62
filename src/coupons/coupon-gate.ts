import { DurableObject } from "cloudflare:workers";
import { isConstraintViolation } from "../db/errors";
import { describeError, log } from "../lib/log";
import {
  issueStatements,
  issuedIds,
  readGateSnapshot,
  readPendingOutcome,
  type CouponTerms,
  type GateSnapshot,
  type PendingIssue,
} from "./issue-ledger";
import { expiryOf, isWithinIssueWindow } from "./rules";
import type { UserCoupon } from "./schemas";

// One object per coupon: the authority on who gets it.
//
// It keeps the coupon's terms, its issued count and the set of holders in its own SQLite storage and
// decides each request from them synchronously, so concurrent requests interleave only between whole
// decisions and can never both take the last piece or both admit one user. Admitted issues are then
// written to D1 in group commits: whatever is admitted while one batch is in flight goes into the next
// single batch. A caller hears back only after its row is committed.
//
// Invariant: the step that admits a user also records them in `pending`, and they leave `pending` only
// once their batch's outcome is known. So every holder outside `pending` has a row in D1 and is counted
// there, the object's count is D1's plus the pending ones, and storage can be trusted across lives:
// waking costs O(pending), not O(holders). Admissions wait while a reconciliation (below) runs. D1 stays
// the last line of defence: UNIQUE (coupon_id, user_id) and CHECK (issued_count <= total_quantity) catch
// whatever reaches it behind this object's back.
//
// On each failure:
// - D1 refuses a batch on a constraint (it rolled the whole batch back): the group is retried one by one
//   so a bad row fails alone. UNIQUE: D1 already has the user's row (a late batch, below), so they stay a
//   holder. The count CHECK: D1 is sold out, so the admission is undone and the count set to the total.
//   An unknown user: undone.
// - D1 down, or a batch whose reply is lost (the outcome is unknown): its callers get 503 and their
//   admissions stay pending, holding their pieces. The next request first reconciles, once the groups
//   in flight are done: one D1 batch asks which pending users have a row (kept) and which do not
//   (undone). While D1 stays down that read fails too, and requests answer 503 without admitting anyone.
// - Crash or abort mid group commit, eviction, restart, deploy: storage has every admission, committed
//   or pending. The new life's first request reconciles `pending` the same way, with the coupon row read
//   in the same batch; if D1's issued_count then differs from the object's, something was written
//   behind its back, so the state is rebuilt from D1 once (O(holders)). Storage without STORAGE_VERSION
//   (from before `pending` existed, or never loaded) is rebuilt the same way.
// - A late batch (sent by an earlier life, or before its unknown outcome was reconciled, and landing
//   after the reconciliation undid it): its users are holders in D1 only and D1's count runs ahead of the
//   object's. D1's UNIQUE refuses those users a second row and its CHECK a piece beyond the total, and the
//   object adjusts to each refusal (above); the next reconciliation sees the counts differ and rebuilds.

/**
 * The layout of this object's storage: storage without this marker (or with another) is rebuilt from D1 on
 * waking. Bump it with any change to the tables below, except a new column of `coupon`: that row is
 * rewritten from D1 by the reconciliation every life runs before its first admission.
 */
export const STORAGE_VERSION = 2;

export type IssueRefusal =
  | "COUPON_NOT_FOUND"
  | "COUPON_NOT_ISSUABLE"
  | "COUPON_ALREADY_ISSUED"
  | "COUPON_SOLD_OUT"
  | "USER_NOT_FOUND"
  | "SERVICE_UNAVAILABLE";

export type IssueOutcome = { ok: true; userCoupon: UserCoupon } | { ok: false; code: IssueRefusal };

export interface IssueRequest {
  couponId: number;
  userId: number;
  /** The Worker's clock: the object never reads the wall clock for a business decision. */
  now: string;
}

interface Admission extends PendingIssue {
  settle(outcome: IssueOutcome): void;
}

/** Issues per D1 batch (plus the count's UPDATE): far inside D1's 1,000 queries per invocation. */
const MAX_GROUP = 100;
/** Holders per INSERT when rebuilding from D1. */
const HOLDERS_PER_INSERT = 10_000;

const UNIQUE_HOLDER = "user_coupons.coupon_id, user_coupons.user_id";
const ISSUED_WITHIN_TOTAL = "coupons_issued_within_total";

const refuse = (code: IssueRefusal): IssueOutcome => ({ ok: false, code });

export class CouponGate extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  /** Storage may hold admissions whose outcome only D1 knows: so at the start of each life, and after an unknown outcome. */
  private stale = true;
  private reconciling = false;
  /** The latest reconciliation: true when it found the coupon. */
  private reconciled: Promise<boolean> = Promise.resolve(false);
  private readonly waiting: Admission[] = [];
  private flushing = false;
  private drained: Promise<void> = Promise.resolve();

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS coupon (
      id INTEGER PRIMARY KEY, name TEXT NOT NULL, discount_type TEXT NOT NULL, discount_value INTEGER NOT NULL,
      min_order_amount INTEGER NOT NULL, total_quantity INTEGER NOT NULL, issued_count INTEGER NOT NULL,
      issue_starts_at TEXT, issue_ends_at TEXT, valid_days INTEGER NOT NULL,
      CHECK (issued_count >= 0 AND issued_count <= total_quantity))`);
    const columns = this.sql.exec<{ name: string }>("PRAGMA table_info(coupon)").toArray().map((c) => c.name);
    // Objects from before capped PERCENT coupons: the column is added here and filled at the next reconciliation.
    if (!columns.includes("max_discount_amount")) this.sql.exec("ALTER TABLE coupon ADD COLUMN max_discount_amount INTEGER");
    this.sql.exec("CREATE TABLE IF NOT EXISTS holders (user_id INTEGER PRIMARY KEY)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS pending (user_id INTEGER PRIMARY KEY)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)");
  }

  async issue({ couponId, userId, now }: IssueRequest): Promise<IssueOutcome> {
    // Admit only when no reconciliation is running or due: one may start while this request waits.
    while (this.stale || this.reconciling) {
      try {
        if (!(await this.reconcile(couponId))) return refuse("COUPON_NOT_FOUND");
      } catch (error) {
        log("error", "coupon gate could not read D1", { couponId, ...describeError(error) });
        return refuse("SERVICE_UNAVAILABLE");
      }
    }
    // No await from here until the admission is queued: the check and the write are one step.
    const coupon = this.terms();
    const issuedAt = new Date(now);
    if (!isWithinIssueWindow({ issueStartsAt: coupon.issue_starts_at, issueEndsAt: coupon.issue_ends_at }, issuedAt)) {
      return refuse("COUPON_NOT_ISSUABLE");
    }
    if (this.holds(userId)) return refuse("COUPON_ALREADY_ISSUED");
    if (coupon.issued_count >= coupon.total_quantity) return refuse("COUPON_SOLD_OUT");
    this.admit(userId);
    return new Promise<IssueOutcome>((settle) => {
      this.waiting.push({
        userId,
        issuedAt: issuedAt.toISOString(),
        expiresAt: expiryOf(issuedAt, coupon.valid_days).toISOString(),
        settle,
      });
      this.startFlushing();
    });
  }

  /**
   * For the audit, read-only (it never starts a reconciliation): the gate's count, or null when it is not
   * live for `couponId` (it reconciles with D1 before its next admission). `settled`: no reconciliation or
   * batch running and nothing pending, when the count must equal D1's issued_count.
   */
  async auditView(couponId: number): Promise<{ issuedCount: number; settled: boolean } | null> {
    if (this.stale || !this.trusts(couponId)) return null;
    const pending = this.sql.exec<{ n: number }>("SELECT count(*) AS n FROM pending").one().n;
    return { issuedCount: this.terms().issued_count, settled: !this.reconciling && !this.flushing && pending === 0 };
  }

  /** Starts a reconciliation if one is due and none is running; resolves with the running or latest one. */
  private reconcile(couponId: number): Promise<boolean> {
    if (this.stale && !this.reconciling) {
      this.stale = false;
      this.reconciling = true;
      this.reconciled = this.reconcilePending(couponId).then(
        (found) => {
          this.reconciling = false;
          // A coupon created after this lookup must still be found: only a found coupon is settled.
          if (!found) this.stale = true;
          return found;
        },
        (error: unknown) => {
          this.reconciling = false;
          this.stale = true;
          throw error;
        },
      );
    }
    return this.reconciled;
  }

  // Learns the outcome of every pending admission from D1 and applies it: committed stays a holder,
  // anything else is undone. Runs when no batch is in flight and no request can admit, so the object's
  // count must then equal D1's; when it does not, D1 is right and the state is rebuilt from it.
  private async reconcilePending(couponId: number): Promise<boolean> {
    while (this.flushing) await this.drained;
    if (!this.trusts(couponId)) return this.rebuild(await readGateSnapshot(this.env.DB, couponId));
    const pending = this.sql.exec<{ user_id: number }>("SELECT user_id FROM pending").toArray().map((r) => r.user_id);
    const outcome = await readPendingOutcome(this.env.DB, couponId, pending);
    if (!outcome) return this.rebuild(null);
    this.ctx.storage.transactionSync(() => {
      for (const userId of pending) {
        if (outcome.committed.has(userId)) this.confirm([userId]);
        else this.undo(userId);
      }
    });
    const count = this.terms().issued_count;
    if (count !== outcome.coupon.issued_count) {
      log("warn", "coupon gate disagrees with D1; rebuilding from it", {
        couponId,
        objectCount: count,
        d1Count: outcome.coupon.issued_count,
      });
      return this.rebuild(await readGateSnapshot(this.env.DB, couponId));
    }
    this.ctx.storage.transactionSync(() => {
      this.sql.exec("DELETE FROM coupon");
      this.insertTerms(outcome.coupon);
    });
    return true;
  }

  /** True when storage was written by this layout for this coupon, so only `pending` needs D1. */
  private trusts(couponId: number): boolean {
    const version = this.sql.exec<{ value: number }>("SELECT value FROM meta WHERE key = 'version'").toArray()[0];
    const coupon = this.sql.exec<{ id: number }>("SELECT id FROM coupon").toArray()[0];
    return version?.value === STORAGE_VERSION && coupon?.id === couponId;
  }

  /** Replaces the whole state with D1's (O(holders)); an unknown coupon leaves it empty. */
  private rebuild(snapshot: GateSnapshot | null): boolean {
    this.ctx.storage.transactionSync(() => {
      for (const table of ["coupon", "holders", "pending", "meta"]) this.sql.exec(`DELETE FROM ${table}`);
      if (!snapshot) return;
      this.insertTerms(snapshot.coupon);
      for (let i = 0; i < snapshot.holders.length; i += HOLDERS_PER_INSERT) {
        const chunk = JSON.stringify(snapshot.holders.slice(i, i + HOLDERS_PER_INSERT));
        this.sql.exec("INSERT INTO holders (user_id) SELECT value FROM json_each(?)", chunk);
      }
      this.sql.exec("INSERT INTO meta (key, value) VALUES ('version', ?)", STORAGE_VERSION);
    });
    return snapshot !== null;
  }

  private insertTerms(c: CouponTerms): void {
    this.sql.exec(
      `INSERT INTO coupon (id, name, discount_type, discount_value, min_order_amount, max_discount_amount, total_quantity,
         issued_count, issue_starts_at, issue_ends_at, valid_days) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      c.id, c.name, c.discount_type, c.discount_value, c.min_order_amount, c.max_discount_amount, c.total_quantity,
      c.issued_count, c.issue_starts_at, c.issue_ends_at, c.valid_days,
    );
  }

  private startFlushing(): void {
    if (this.flushing) return;
    this.flushing = true;
    this.drained = this.flush();
  }

  private async flush(): Promise<void> {
    try {
      while (this.waiting.length > 0) {
        const group = this.waiting.splice(0, MAX_GROUP);
        await this.commit(group).catch((error: unknown) => this.unknownOutcome(group, error));
      }
    } finally {
      this.flushing = false;
    }
  }

  private async commit(group: Admission[]): Promise<void> {
    const coupon = this.terms();
    let ids: (number | null)[];
    try {
      ids = issuedIds(await this.env.DB.batch(issueStatements(this.env.DB, coupon.id, group)), group.length);
    } catch (error) {
      if (!isConstraintViolation(error, "constraint failed")) return this.unknownOutcome(group, error);
      // D1 rolled the batch back, and one row breaking a constraint fails all of it: retry each alone,
      // so it fails alone.
      if (group.length > 1) {
        for (const admission of group) await this.commit([admission]);
      } else {
        this.refused(group[0]!, error);
      }
      return;
    }
    this.confirm(group.filter((_, i) => ids[i] != null).map((a) => a.userId));
    group.forEach((admission, i) => {
      const id = ids[i];
      if (id === null || id === undefined) {
        this.undo(admission.userId);
        admission.settle(refuse("USER_NOT_FOUND"));
      } else {
        admission.settle({ ok: true, userCoupon: toUserCoupon(coupon, id, admission) });
      }
    });
  }

  /** D1 refused this one admission on a constraint, so it wrote nothing. */
  private refused(admission: Admission, error: unknown): void {
    // A UNIQUE or count CHECK failure means D1 holds rows this object never saw (a late batch). D1 is
    // right; adjust to it.
    if (isConstraintViolation(error, UNIQUE_HOLDER)) {
      // The user's row is in D1 and counted there, so keep them as a holder, counted here too.
      this.confirm([admission.userId]);
      admission.settle(refuse("COUPON_ALREADY_ISSUED"));
      return;
    }
    this.undo(admission.userId);
    if (isConstraintViolation(error, ISSUED_WITHIN_TOTAL)) {
      this.sql.exec("UPDATE coupon SET issued_count = total_quantity");
      admission.settle(refuse("COUPON_SOLD_OUT"));
      return;
    }
    log("error", "coupon issue refused by D1", { userId: admission.userId, ...describeError(error) });
    admission.settle(refuse("SERVICE_UNAVAILABLE"));
  }

  /** The batch may or may not have committed: keep the admissions pending until a reconciliation asks D1. */
  private unknownOutcome(group: Admission[], error: unknown): void {
    log("error", "coupon group commit outcome unknown", { size: group.length, ...describeError(error) });
    this.stale = true;
    for (const admission of group) admission.settle(refuse("SERVICE_UNAVAILABLE"));
  }

  private terms(): CouponTerms {
    return this.sql.exec<CouponTerms>("SELECT * FROM coupon").one();
  }

  private holds(userId: number): boolean {
    return this.sql.exec("SELECT 1 FROM holders WHERE user_id = ?", userId).toArray().length > 0;
  }

  private admit(userId: number): void {
    this.sql.exec("INSERT INTO holders (user_id) VALUES (?)", userId);
    this.sql.exec("INSERT INTO pending (user_id) VALUES (?)", userId);
    this.sql.exec("UPDATE coupon SET issued_count = issued_count + 1");
  }

  /** Their rows are in D1: they stay holders, no longer pending. */
  private confirm(userIds: number[]): void {
    this.sql.exec("DELETE FROM pending WHERE user_id IN (SELECT value FROM json_each(?))", JSON.stringify(userIds));
  }

  /** Takes back a pending admission; a no-op for one already settled, so it is never undone twice. */
  private undo(userId: number): void {
    if (this.sql.exec("DELETE FROM pending WHERE user_id = ? RETURNING user_id", userId).toArray().length === 0) return;
    this.sql.exec("DELETE FROM holders WHERE user_id = ?", userId);
    this.sql.exec("UPDATE coupon SET issued_count = issued_count - 1");
  }
}

function toUserCoupon(coupon: CouponTerms, id: number, issue: PendingIssue): UserCoupon {
  return {
    id,
    couponId: coupon.id,
    userId: issue.userId,
    name: coupon.name,
    discountType: coupon.discount_type,
    discountValue: coupon.discount_value,
    minOrderAmount: coupon.min_order_amount,
    maxDiscountAmount: coupon.max_discount_amount,
    status: "AVAILABLE",
    issuedAt: issue.issuedAt,
    expiresAt: issue.expiresAt,
    usedAt: null,
  };
}
