import { DUPLICATE_ORDER, isConstraintViolation } from "../db/errors";
import { AppError, ORDER_OUTCOME_UNKNOWN, type ErrorCode } from "../lib/errors";
import { claimNewKeys, claimOf, claimsMade, keyId, keyRowsOf, keysInUse, mayShare, type Claim, type ClaimToMake, type KeyRow } from "../lib/idempotency";
import { describeError, log } from "../lib/log";
import {
  COUPON_FOR_ORDER_SQL,
  orderStatements,
  priceOrder,
  translateWriteError,
  writtenOrder,
  type CouponForOrder,
  type OrderToWrite,
  type ProductPrice,
  type WrittenOrder,
} from "../orders/order-ledger";
import { orderJsonSql } from "../orders/queries";
import type { OutboxRow } from "../orders/outbox";
import type { ReserveResult } from "./product-stock";

// Group commit for the orders of one product, run by its stock object after it reserved their units:
// whatever is admitted while one group is being written forms the next group, which costs one D1 read
// batch (prices, balances, coupons, orders already placed under the same keys) and one D1 write batch
// (every row of every order in it), however many orders it holds. Each caller hears back once its own
// rows are committed.
//
// An order under an Idempotency-Key the Worker has not claimed (`claimToMake`) is claimed here, with the
// group's other new keys, by the first statement of the group's read, and only then reserved: its units
// are taken once its claim is committed, as if the Worker had claimed it first, for one write per group
// instead of one per order. A key that already has a row is answered "key in use" (nothing held) and the
// Worker answers from the key (replay, 409, 422, a takeover).
//
// On each failure:
// - An order refused by its checks (coupon, balance) fails alone before the write; its units go back. One
//   refused only because an earlier order of its group spends the same balance or coupon waits for that
//   write and is priced again at the head of the next group (it keeps its units meanwhile).
// - The write batch refused by a constraint (a balance spent, a coupon used meanwhile): the batch is one
//   transaction, so the group is written again one order per batch, and only the order a constraint
//   refuses fails (its units go back; a stock CHECK also re-syncs the object).
// - The read fails: nothing was written; every order of the group gets 503 and its units go back.
// - The write fails otherwise (D1 down, reply lost): it may have committed. Every order of the group is
//   answered 503 "outcome unknown" and its reservation is settled against D1 within seconds.

/**
 * Orders per group: about a dozen statements each, so a group's write stays near 300 queries, well
 * inside D1's 1,000 queries per invocation even with the read and a one-by-one retry of a few orders.
 */
const MAX_GROUP = 25;

export interface SingleProductOrder {
  orderKey: string;
  userId: number;
  quantity: number;
  userCouponId: number | null;
  /** The Worker's clock: the object never reads the wall clock for a business decision. */
  now: string;
  claim: Claim | null;
  /** An Idempotency-Key the Worker did not claim: claimed here, then reserved (`orderKey` is then replaced). */
  claimToMake?: ClaimToMake | null;
  /** The Worker's request, for the logs and the order's queue messages. */
  requestId?: string;
}

export type GroupOutcome = (
  /** `stored`: this order's batch also stored the idempotent response (false for a replayed order). */
  | { ok: true; body: string; stored: boolean }
  /** `stock`: the reservation's refusal (of an order claimed here); `keyInUse`: its key had a row (`keyRow`, as read). */
  | { ok: false; code: ErrorCode; detail: string; outcomeUnknown?: boolean; stock?: ReserveResult; keyInUse?: boolean; keyRow?: KeyRow }
) & {
  /** The claim this group made for the order (`claimToMake`), for the Worker to finish. */
  claim?: Claim;
};

/** What the group tells the stock object about each order's units. */
export interface GroupHooks {
  /** Takes the units of an order claimed by the group, or refuses. */
  reserve(order: SingleProductOrder): Promise<ReserveResult>;
  committed(orderKey: string): void;
  released(orderKey: string): void;
  unknown(orderKey: string): void;
  resync(): void;
  dispatch(outbox: OutboxRow[], now: string): void;
}

interface Waiting {
  /** Replaced once the group claims its key (`claimToMake`). */
  order: SingleProductOrder;
  answer(outcome: GroupOutcome): void;
  /** Sent to the next group once already, its write having met a row of its own order key (see writeFailed). */
  resubmitted?: true;
}

interface Priced extends Waiting {
  row: OrderToWrite;
}

export class OrderGroup {
  private readonly waiting: Waiting[] = [];
  private flushing = false;
  /** D1 write batches and the orders they committed, for operations and the benchmark. */
  readonly counters = { writeBatches: 0, ordersWritten: 0 };

  constructor(
    private readonly db: D1Database,
    private readonly productId: number,
    private readonly hooks: GroupHooks,
  ) {}

  submit(order: SingleProductOrder, resubmitted?: true): Promise<GroupOutcome> {
    return new Promise((answer) => {
      this.waiting.push({ order, answer, resubmitted });
      if (!this.flushing) {
        this.flushing = true;
        void this.flush();
      }
    });
  }

  private async flush(): Promise<void> {
    try {
      while (this.waiting.length > 0) {
        const group = this.waiting.splice(0, MAX_GROUP);
        await this.run(group).catch((error: unknown) => {
          // Not expected (run answers its own failures), but no caller may be left waiting forever.
          log("error", "order group crashed", { productId: this.productId, ...describeError(error) });
          for (const w of group) this.unknown(w, error);
        });
      }
    } finally {
      this.flushing = false;
    }
  }

  private async run(waiting: Waiting[]): Promise<void> {
    const group = oncePerKey(waiting);
    let inputs: GroupInputs;
    try {
      inputs = await readGroupInputs(this.db, this.productId, group.map((w) => w.order));
    } catch (error) {
      log("error", "order group: D1 read failed", { productId: this.productId, ...describeError(error) });
      const unavailable = new AppError("SERVICE_UNAVAILABLE", "The order could not be placed right now; retry shortly");
      for (const w of group) {
        // Its claim may have been committed all the same (a lost reply): handed back, the Worker releases
        // it by its owner token (a no-op if it never landed), so the retry is not kept waiting for the lock.
        const claim = w.order.claimToMake ? await claimOf(w.order.claimToMake) : undefined;
        this.refuse({ ...w, answer: handingBack(w.answer, claim) }, unavailable);
      }
      return;
    }
    const priced: Priced[] = [];
    const deferred: Waiting[] = [];
    for (const [i, w] of group.entries()) {
      if (w.order.claimToMake) {
        const claim = inputs.claims[i];
        if (!claim) {
          // Its row as it was before this group's claims (none for the twin of a key claimed in this group).
          const keyRow = inputs.keysInUse.get(keyId(w.order.claimToMake));
          w.answer({ ok: false, code: "IDEMPOTENCY_IN_PROGRESS", detail: "The idempotency key already has a row", keyInUse: true, keyRow });
          continue;
        }
        // From here on it is a claimed order, as if the Worker had claimed it: same order key, same answers.
        w.order = { ...w.order, orderKey: `idem:${claim.effectRef}`, claim, claimToMake: null };
        w.answer = handingBack(w.answer, claim);
        let stock: ReserveResult;
        try {
          stock = await this.hooks.reserve(w.order);
        } catch (error) {
          this.refuse(w, error);
          continue;
        }
        if (!stock.ok) {
          w.answer({ ok: false, code: stock.reason, detail: "refused by the stock object", stock });
          continue;
        }
      }
      const placed = inputs.placed.get(w.order.orderKey);
      if (placed !== undefined) {
        // Another run of this same keyed request committed it: its units are sold once (see settle).
        this.hooks.committed(w.order.orderKey);
        w.answer({ ok: true, body: placed, stored: false });
        continue;
      }
      try {
        priced.push({ ...w, row: inputs.price(w.order) });
      } catch (error) {
        if (error instanceof PricedInNextGroup) deferred.push(w);
        else this.refuse(w, error);
      }
    }
    if (priced.length > 0) await this.write(priced);
    // At the head of the next group, each is priced against D1 as the orders it waited for left it: one is
    // never deferred twice behind the same order, and never refused for a spend that did not happen.
    this.waiting.unshift(...deferred);
  }

  private async write(group: Priced[]): Promise<void> {
    const perOrder = group.map((p) => orderStatements(this.db, p.order.orderKey, p.row, p.order.claim));
    let results: D1Result<Record<string, unknown>>[];
    try {
      results = await this.db.batch<Record<string, unknown>>(perOrder.flat());
    } catch (error) {
      if (group.length > 1 && isConstraintViolation(error, "constraint failed")) {
        // One order's constraint fails the whole transaction: write each alone, so it fails alone.
        for (const p of group) await this.write([p]);
        return;
      }
      for (const p of group) this.writeFailed(p, error);
      return;
    }
    this.counters.writeBatches += 1;
    this.counters.ordersWritten += group.length;
    const outbox: OutboxRow[] = [];
    let at = 0;
    group.forEach((p, i) => {
      const count = perOrder[i]!.length;
      const written: WrittenOrder = writtenOrder(results.slice(at, at + count));
      at += count;
      outbox.push(...written.outbox);
      this.hooks.committed(p.order.orderKey);
      p.answer({ ok: true, body: written.body, stored: p.order.claim !== null });
    });
    log("info", "order group committed", { productId: this.productId, orders: group.length });
    this.hooks.dispatch(outbox, group.at(-1)!.order.now);
  }

  /** One order's own batch failed. */
  private writeFailed(p: Priced, error: unknown): void {
    if (p.order.claim !== null && isConstraintViolation(error, DUPLICATE_ORDER)) {
      // Another run of this keyed request committed first (or its coupon went to another order): the next
      // group's read finds the order and replays it, or refuses the coupon.
      if (!p.resubmitted) void this.submit(p.order, true).then(p.answer);
      // Again: yet another run landed meanwhile, or D1 shows a coupon free that an order holds. Never a loop,
      // and never a refusal that could be false: unknown to this run, so D1 settles its units, the claim stays.
      else this.unknown(p, error);
      return;
    }
    const refusal = translateWriteError(error);
    if (refusal instanceof AppError) {
      if (isConstraintViolation(error, "products_stock_non_negative")) this.hooks.resync();
      this.refuse(p, refusal);
      return;
    }
    this.unknown(p, error);
  }

  private refuse(w: Waiting, error: unknown): void {
    // A run that took over a crashed one may share its reservation, and that run may still commit: D1 decides.
    if (mayShare(w.order.claim)) this.hooks.unknown(w.order.orderKey);
    else this.hooks.released(w.order.orderKey);
    if (error instanceof AppError) {
      w.answer({ ok: false, code: error.code, detail: error.message });
      return;
    }
    log("error", "order group: order failed", { productId: this.productId, orderKey: w.order.orderKey, requestId: w.order.requestId, ...describeError(error) });
    w.answer({ ok: false, code: "SERVICE_UNAVAILABLE", detail: "The order could not be placed right now; retry shortly" });
  }

  private unknown(w: Waiting, error: unknown): void {
    log("error", "order group: write outcome unknown", {
      productId: this.productId,
      orderKey: w.order.orderKey,
      requestId: w.order.requestId,
      ...describeError(error),
    });
    this.hooks.unknown(w.order.orderKey);
    w.answer({
      ok: false,
      code: "SERVICE_UNAVAILABLE",
      detail: ORDER_OUTCOME_UNKNOWN,
      outcomeUnknown: true,
    });
  }
}

/** An answer that hands `claim` (made by the group) back to the Worker with every outcome, to finish it. */
function handingBack(answer: Waiting["answer"], claim: Claim | undefined): Waiting["answer"] {
  return (outcome) => answer({ ...outcome, claim });
}

/**
 * Runs of one keyed request (a retry that took over a slow first run) in the same group are one order:
 * the first is placed and priced, and every run hears its outcome. Priced apart, the second would count
 * the same payment twice against one balance and could be refused for an order that is placed.
 */
function oncePerKey(waiting: Waiting[]): Waiting[] {
  const first = new Map<string, Waiting>();
  for (const w of waiting) {
    const earlier = first.get(w.order.orderKey);
    if (!earlier) {
      first.set(w.order.orderKey, { ...w });
      continue;
    }
    const answerEarlier = earlier.answer;
    earlier.answer = (outcome) => {
      answerEarlier(outcome);
      w.answer(outcome.ok ? { ...outcome, stored: false } : outcome);
    };
  }
  return [...first.values()];
}

/**
 * An order refused only for what earlier orders of its group are about to spend (the user's balance, their
 * coupon): their write may yet fail, so it is priced again in the next group instead of refused.
 */
class PricedInNextGroup extends Error {}

interface GroupInputs {
  placed: Map<string, string>;
  /** The rows the group's keys to claim already had, by `keyId`. */
  keysInUse: Map<string, KeyRow>;
  /** The claim made for each order of the group (by position), for those with `claimToMake`. */
  claims: (Claim | null)[];
  /**
   * Prices one order against the group's snapshot, counting what earlier orders of the group spent; throws
   * PricedInNextGroup for an order refused only for that spend.
   */
  price(order: SingleProductOrder): OrderToWrite;
}

async function readGroupInputs(db: D1Database, productId: number, orders: SingleProductOrder[]): Promise<GroupInputs> {
  const json = (values: unknown[]) => JSON.stringify(values);
  const toMake = orders.flatMap((o) => (o.claimToMake ? [o.claimToMake] : []));
  // The claims first (after reading the rows the keys already have, which answer a key in use): the reads below
  // see the group's own claims, and a D1 that cannot be read claims nothing.
  const claiming = toMake.length > 0 ? [keysInUse(db, toMake), claimNewKeys(db, toMake)] : [];
  const results = await db.batch<Record<string, unknown>>([
    ...claiming,
    db.prepare("SELECT id, name, price FROM products WHERE id = ?").bind(productId),
    db.prepare("SELECT id, balance FROM users WHERE id IN (SELECT value FROM json_each(?))").bind(json(orders.map((o) => o.userId))),
    db
      .prepare(`${COUPON_FOR_ORDER_SQL} WHERE uc.id IN (SELECT value FROM json_each(?))`)
      .bind(json(orders.flatMap((o) => (o.userCouponId === null ? [] : [o.userCouponId])))),
    db
      .prepare(`SELECT o.order_key, ${orderJsonSql("o")} AS body FROM orders o WHERE o.order_key IN (SELECT value FROM json_each(?))`)
      .bind(json(orders.filter((o) => o.claim !== null).map((o) => o.orderKey))),
  ]);
  const [productRows, userRows, couponRows, placedRows] = results.slice(claiming.length);
  const inUseRows = claiming.length > 0 ? results[0]!.results : [];
  const claimRows = claiming.length > 0 ? results[1]!.results : [];
  const products = new Map((productRows!.results as unknown as ProductPrice[]).map((p) => [p.id, p]));
  const snapshotBalances = new Map(userRows!.results.map((u) => [u.id as number, u.balance as number]));
  const balances = new Map(snapshotBalances);
  const coupons = new Map((couponRows!.results as unknown as CouponForOrder[]).map((c) => [c.id, c]));
  const placed = new Map(placedRows!.results.map((r) => [r.order_key as string, r.body as string]));
  const made = await claimsMade(toMake, claimRows);
  const claims = orders.map((o) => (o.claimToMake ? made.shift()! : null));
  const usedCoupons = new Set<number>();
  return {
    placed,
    keysInUse: keyRowsOf(inUseRows),
    claims,
    price(order) {
      const balance = balances.get(order.userId);
      if (balance === undefined) throw new AppError("USER_NOT_FOUND", `User ${order.userId} does not exist`);
      let coupon: CouponForOrder | null = null;
      if (order.userCouponId !== null) {
        coupon = coupons.get(order.userCouponId) ?? null;
        if (!coupon) throw new AppError("COUPON_NOT_USABLE", `User coupon ${order.userCouponId} does not exist`);
      }
      // Taken by an earlier order of this group (its own user's coupon: another's is refused below as missing).
      const takenInGroup = coupon !== null && usedCoupons.has(coupon.id) && coupon.user_id === order.userId;
      let row: OrderToWrite;
      try {
        // Priced as the group found D1: a refusal here stands whatever the earlier orders of the group do.
        row = { ...priceOrder(order.userId, [{ productId, quantity: order.quantity }], products, coupon, snapshotBalances.get(order.userId)!, new Date(order.now)), requestId: order.requestId };
      } catch (error) {
        // Unless the coupon is being taken: if that write lands, COUPON_NOT_USABLE comes first.
        const shortAnyway = error instanceof AppError && error.code === "INSUFFICIENT_BALANCE";
        throw takenInGroup && shortAnyway ? new PricedInNextGroup() : error;
      }
      // Refused only for what earlier orders of this group are about to spend: they may yet fail.
      if (takenInGroup || balance < row.paidAmount) throw new PricedInNextGroup();
      balances.set(order.userId, balance - row.paidAmount);
      if (coupon) usedCoupons.add(coupon.id);
      return row;
    },
  };
}
