import { DUPLICATE_ORDER, isConstraintViolation } from "../db/errors";
import { AppError, ORDER_OUTCOME_UNKNOWN, OutcomeUnknownError } from "../lib/errors";
import type { Clock } from "../lib/clock";
import type { PlaceOrder } from "./schemas";
import {
  commitStock,
  giveBack,
  placeSingleProductOrder,
  reserveStock,
  resyncStock,
  settleStockSoon,
  soldOutRefusal,
  type StockLine,
} from "../inventory/stock";
import { describeError, log } from "../lib/log";
import { currentRequestId } from "../lib/request-context";
import { mayShare, type Claim, type ClaimToMake } from "../lib/idempotency";
import {
  COUPON_FOR_ORDER_SQL,
  placedOrderJson,
  priceOrder,
  translateWriteError,
  writeOrder,
  type CouponForOrder,
  type ProductPrice,
  type WrittenOrder,
} from "./order-ledger";
import { orderJsonSql } from "./queries";
import { dispatchOutbox, type OrderQueues } from "./outbox";

export interface PlaceOrderDeps {
  env: Env;
  clock: Clock;
  queues: OrderQueues;
  /** Work that may finish after the response (ctx.waitUntil). */
  defer: (work: Promise<unknown>) => void;
  /** The request's idempotency claim, completed in the order's own batch. */
  claim: Claim | null;
  /** Or its Idempotency-Key unclaimed, for the product's object to claim (one-product orders only). */
  claimToMake?: ClaimToMake;
}

/**
 * Places an order paid from the wallet, all or nothing. An order of one product (the drop's case) is
 * placed by that product's stock object, which group-commits its orders (src/inventory/order-group.ts).
 * An order over several products is placed here:
 * 1. reserve stock in each product's object first (the seed checks stock before payment, and a sold-out
 *    product then refuses without touching D1);
 * 2. read prices, balance and coupon; refuse what is certainly refused;
 * 3. one D1 batch (one transaction) writes the order, items, stock, balance, ledger, coupon use and outbox;
 *    the schema's constraints refuse it whole if the balance, stock or coupon changed meanwhile;
 * 4. after commit: confirm the reservations and hand the outbox to the queues, off the response path.
 * From the reservation on, every way out either commits the reservations or gives them back at once;
 * only a write whose outcome is unknown leaves them to the objects, which settle them against D1 within
 * seconds. The caller runs this to its end even if the client goes away (see the order route).
 * Returns the order as JSON text (see orderJsonSql), as stored for an idempotent replay.
 */
export async function placeOrder(deps: PlaceOrderDeps, userId: number, input: PlaceOrder): Promise<string> {
  const { env } = deps;
  // Under an Idempotency-Key the order key is the claim's effect: every run of the request (a retry that
  // took over a crashed or slow first run) writes the same UNIQUE order key, so only one order exists.
  const orderKey = deps.claim ? `idem:${deps.claim.effectRef}` : crypto.randomUUID();
  const [only, ...more] = input.items;
  if (deps.claimToMake && more.length > 0) throw new Error("only a one-product order is claimed by its object");
  if (more.length === 0) {
    // One product: its object places the order from reservation to commit, in a group commit with the
    // product's other orders (the lookup of an order already placed under this key is in its read).
    const placed = await placeSingleProductOrder(env, only!, {
      orderKey,
      userId,
      quantity: only!.quantity,
      userCouponId: input.userCouponId ?? null,
      now: deps.clock.now().toISOString(),
      claim: deps.claim,
      claimToMake: deps.claimToMake ?? null,
      requestId: currentRequestId(),
    });
    const claim = deps.claim ?? deps.claimToMake?.made;
    if (claim && placed.stored) claim.storedWithEffect = true;
    return placed.body;
  }
  if (deps.claim) {
    const placed = await placedOrderJson(env.DB, orderKey).catch(unavailable);
    if (placed !== null) return placed;
  }
  const lines = input.items.map((i) => ({ productId: i.productId, quantity: i.quantity }));
  await reserveStock(env, orderKey, lines, userId, mayShare(deps.claim));

  let written: WrittenOrder & { createdAt: string };
  try {
    written = await payAndWrite(deps, orderKey, userId, input);
  } catch (error) {
    return settleFailedWrite(env, orderKey, lines, error, deps.claim);
  }
  if (deps.claim) deps.claim.storedWithEffect = true;
  deps.defer(
    Promise.all([commitStock(env, orderKey, lines), dispatchOutbox(env.DB, deps.queues, written.outbox, written.createdAt)]),
  );
  return written.body;
}

/**
 * The refusal of a one-product order for a product this isolate saw sold out within the last second:
 * given before the idempotency claim (stored in the same single write for a new key).
 */
export function knownSoldOut(input: PlaceOrder): AppError | null {
  const [only, ...more] = input.items;
  return more.length === 0 ? soldOutRefusal(only!.productId) : null;
}

/** Steps 2 and 3: the checks that need D1, then the order's one batch. */
async function payAndWrite(deps: PlaceOrderDeps, orderKey: string, userId: number, input: PlaceOrder) {
  const now = deps.clock.now();
  const { products, balance, coupon, placed } = await readOrderInputs(deps.env.DB, userId, input, orderKey).catch(unavailable);
  // Another run of this keyed request committed since the lookup before the reservation: read in the same
  // snapshot as the balance and the coupon, so its payment can never be mistaken for a lack of money.
  if (placed !== null) throw new AlreadyPlaced(placed);
  const order = { ...priceOrder(userId, input.items, products, coupon, balance, now), requestId: currentRequestId() };
  try {
    return { ...(await writeOrder(deps.env.DB, orderKey, order, deps.claim)), createdAt: order.createdAt };
  } catch (error) {
    throw new WriteFailed(error);
  }
}

/** The order's batch threw; what it means decides what happens to the reservations. */
async function settleFailedWrite(env: Env, orderKey: string, lines: StockLine[], error: unknown, claim: Claim | null): Promise<string> {
  if (error instanceof AlreadyPlaced) {
    await commitStock(env, orderKey, lines);
    return error.body;
  }
  if (!(error instanceof WriteFailed)) {
    // Refused (or D1 unreadable) before anything was written: the reservations go back now. Unless this run
    // took over one that may share them and still commit (it crashed): then D1 decides, within seconds.
    await giveBack(env, orderKey, lines, mayShare(claim));
    throw error;
  }
  const cause = error.cause;
  if (claim !== null && isConstraintViolation(cause, DUPLICATE_ORDER)) {
    // Another run of this same request committed first. The units are sold once: the objects remember
    // which order keys they already counted, so confirming here can never count them twice.
    const placed = await placedOrderJson(env.DB, orderKey).catch(() => undefined);
    if (placed === undefined) {
      // Unreadable: placed by that run, or the coupon went to another order. Which is unknown, so D1 settles
      // the units and the claim stays for a retry to find out, as for a lost reply (below).
      await settleStockSoon(env, orderKey, lines);
      throw new OutcomeUnknownError(ORDER_OUTCOME_UNKNOWN, { cause });
    }
    if (placed !== null) {
      await commitStock(env, orderKey, lines);
      return placed;
    }
  }
  const refusal = translateWriteError(cause);
  if (refusal instanceof AppError) {
    // A constraint refused the batch: nothing of it was written, the reservations go back (as above).
    await giveBack(env, orderKey, lines, mayShare(claim));
    // D1 refusing stock an object offered means that object was above D1: it takes D1's numbers again.
    if (isConstraintViolation(cause, "products_stock_non_negative")) await resyncStock(env, lines);
    throw refusal;
  }
  // Any other failure may have committed after all (a lost reply). The reservations are settled
  // against D1 by the stock objects within seconds; a retry with the same Idempotency-Key continues
  // this very order (same order key), so it can never be placed twice.
  await settleStockSoon(env, orderKey, lines);
  throw new OutcomeUnknownError(ORDER_OUTCOME_UNKNOWN, {
    cause,
  });
}

/** The order was found placed by another run of the same keyed request. */
class AlreadyPlaced extends Error {
  constructor(readonly body: string) {
    super("the order was already placed");
  }
}

/** Marks a failure of the order's own batch, as opposed to anything refused before it. */
class WriteFailed extends Error {
  constructor(cause: unknown) {
    super("the order's batch failed", { cause });
  }
}

/** D1 could not be read: nothing was written, so a plain retry is safe. */
function unavailable(error: unknown): never {
  if (error instanceof AppError) throw error;
  log("error", "order: D1 read failed", describeError(error));
  throw new AppError("SERVICE_UNAVAILABLE", "The order could not be placed right now; retry shortly");
}

async function readOrderInputs(db: D1Database, userId: number, input: PlaceOrder, orderKey: string) {
  const ids = JSON.stringify(input.items.map((i) => i.productId));
  const [productRows, userRows, couponRows, placedRows] = await db.batch<Record<string, unknown>>([
    db.prepare("SELECT id, name, price FROM products WHERE id IN (SELECT value FROM json_each(?))").bind(ids),
    db.prepare("SELECT balance FROM users WHERE id = ?").bind(userId),
    db.prepare(`${COUPON_FOR_ORDER_SQL} WHERE uc.id = ?`).bind(input.userCouponId ?? 0),
    db.prepare(`SELECT ${orderJsonSql("o")} AS body FROM orders o WHERE o.order_key = ?`).bind(orderKey),
  ]);
  const placed = (placedRows!.results[0]?.body as string | undefined) ?? null;
  const user = userRows!.results[0] as { balance: number } | undefined;
  if (!user) throw new AppError("USER_NOT_FOUND", `User ${userId} does not exist`);
  const products = new Map((productRows!.results as unknown as ProductPrice[]).map((p) => [p.id, p]));
  let coupon: CouponForOrder | null = null;
  if (input.userCouponId !== undefined) {
    coupon = (couponRows!.results[0] as unknown as CouponForOrder | undefined) ?? null;
    if (!coupon) throw new AppError("COUPON_NOT_USABLE", `User coupon ${input.userCouponId} does not exist`);
  }
  return { products, balance: user.balance, coupon, placed };
}
