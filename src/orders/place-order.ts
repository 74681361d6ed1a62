import { isConstraintViolation } from "../db/errors";
import { AppError, OutcomeUnknownError } from "../lib/errors";
import type { Clock } from "../lib/clock";
import { discountFor, type DiscountType } from "../lib/money";
import type { OrderDto, PlaceOrder } from "./schemas";
import {
  commitStock,
  releaseStock,
  reserveStock,
  resyncStock,
  settleStockSoon,
  type StockLine,
} from "../inventory/stock";
import { describeError, log } from "../lib/log";
import { completeClaim, type Claim } from "../lib/idempotency";
import { dispatchOutbox, type OrderQueues, type OutboxRow } from "./outbox";
import { orderJsonSql } from "./queries";

export interface PlaceOrderDeps {
  env: Env;
  clock: Clock;
  queues: OrderQueues;
  /** Work that may finish after the response (ctx.waitUntil). */
  defer: (work: Promise<unknown>) => void;
  /** The request's idempotency claim, completed in the order's own batch. */
  claim: Claim | null;
}

interface ProductPrice {
  id: number;
  name: string;
  price: number;
}

interface CouponForOrder {
  id: number;
  user_id: number;
  status: string;
  expires_at: string;
  discount_type: DiscountType;
  discount_value: number;
  min_order_amount: number;
  max_discount_amount: number | null;
}

/**
 * Places an order paid from the wallet, all or nothing:
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
  if (deps.claim) {
    const placed = await placedOrderJson(env.DB, orderKey).catch(unavailable);
    if (placed !== null) return placed;
  }
  const lines = input.items.map((i) => ({ productId: i.productId, quantity: i.quantity }));
  await reserveStock(env, orderKey, lines, userId);

  let written: WrittenOrder;
  try {
    written = await payAndWrite(deps, orderKey, userId, input);
  } catch (error) {
    return settleFailedWrite(env, orderKey, lines, error);
  }
  deps.defer(
    Promise.all([commitStock(env, orderKey, lines), dispatchOutbox(env.DB, deps.queues, written.outbox, written.createdAt)]),
  );
  return written.body;
}

/** Steps 2 and 3: the checks that need D1, then the order's one batch. */
async function payAndWrite(deps: PlaceOrderDeps, orderKey: string, userId: number, input: PlaceOrder): Promise<WrittenOrder> {
  const now = deps.clock.now();
  const { products, balance, coupon } = await readOrderInputs(deps.env.DB, userId, input).catch(unavailable);
  const items = input.items.map((line) => {
    const product = products.get(line.productId)!;
    return {
      productId: line.productId,
      name: product.name,
      unitPrice: product.price,
      quantity: line.quantity,
      amount: product.price * line.quantity,
    };
  });
  const totalAmount = items.reduce((sum, i) => sum + i.amount, 0);
  if (coupon) assertCouponUsable(coupon, userId, totalAmount, now);
  const discountAmount = coupon
    ? discountFor(
        { discountType: coupon.discount_type, discountValue: coupon.discount_value, maxDiscountAmount: coupon.max_discount_amount },
        totalAmount,
      )
    : 0;
  const paidAmount = totalAmount - discountAmount;
  if (balance < paidAmount) {
    throw new AppError("INSUFFICIENT_BALANCE", `The order costs ${paidAmount} won; the balance is ${balance}`);
  }
  const createdAt = now.toISOString();
  const order = { userId, items, totalAmount, discountAmount, paidAmount, userCouponId: coupon?.id ?? null, createdAt };
  try {
    return { ...(await writeOrder(deps.env.DB, orderKey, order, deps.claim)), createdAt };
  } catch (error) {
    throw new WriteFailed(error);
  }
}

/** The order's batch threw; what it means decides what happens to the reservations. */
async function settleFailedWrite(env: Env, orderKey: string, lines: StockLine[], error: unknown): Promise<string> {
  if (!(error instanceof WriteFailed)) {
    // Refused (or D1 unreadable) before anything was written: the reservations go back now.
    await releaseStock(env, orderKey, lines);
    throw error;
  }
  const cause = error.cause;
  if (isConstraintViolation(cause, "orders.order_key")) {
    // Another run of this same request committed first. The units are sold once: the objects remember
    // which order keys they already counted, so confirming here can never count them twice.
    const placed = await placedOrderJson(env.DB, orderKey).catch(() => null);
    if (placed !== null) {
      await commitStock(env, orderKey, lines);
      return placed;
    }
  }
  const refusal = translateWriteError(cause);
  if (refusal instanceof AppError) {
    // A constraint refused the batch: nothing was written, the reservations go back now.
    await releaseStock(env, orderKey, lines);
    // D1 refusing stock an object offered means that object was above D1: it takes D1's numbers again.
    if (isConstraintViolation(cause, "products_stock_non_negative")) await resyncStock(env, lines);
    throw refusal;
  }
  // Any other failure may have committed after all (a lost reply). The reservations are settled
  // against D1 by the stock objects within seconds; a retry with the same Idempotency-Key continues
  // this very order (same order key), so it can never be placed twice.
  await settleStockSoon(env, orderKey, lines);
  throw new OutcomeUnknownError("The order may or may not have been placed; retry with the same Idempotency-Key", {
    cause,
  });
}

/** Marks a failure of the order's own batch, as opposed to anything refused before it. */
class WriteFailed extends Error {
  constructor(cause: unknown) {
    super("the order's batch failed", { cause });
  }
}

interface WrittenOrder {
  orderId: number;
  body: string;
  outbox: OutboxRow[];
  createdAt: string;
}

/** D1 could not be read: nothing was written, so a plain retry is safe. */
function unavailable(error: unknown): never {
  if (error instanceof AppError) throw error;
  log("error", "order: D1 read failed", describeError(error));
  throw new AppError("SERVICE_UNAVAILABLE", "The order could not be placed right now; retry shortly");
}

async function readOrderInputs(db: D1Database, userId: number, input: PlaceOrder) {
  const ids = JSON.stringify(input.items.map((i) => i.productId));
  const [productRows, userRows, couponRows] = await db.batch<Record<string, unknown>>([
    db.prepare("SELECT id, name, price FROM products WHERE id IN (SELECT value FROM json_each(?))").bind(ids),
    db.prepare("SELECT balance FROM users WHERE id = ?").bind(userId),
    db
      .prepare(
        `SELECT uc.id, uc.user_id, uc.status, uc.expires_at, c.discount_type, c.discount_value, c.min_order_amount,
                c.max_discount_amount
         FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id WHERE uc.id = ?`,
      )
      .bind(input.userCouponId ?? 0),
  ]);
  const user = userRows!.results[0] as { balance: number } | undefined;
  if (!user) throw new AppError("USER_NOT_FOUND", `User ${userId} does not exist`);
  const products = new Map((productRows!.results as unknown as ProductPrice[]).map((p) => [p.id, p]));
  const missing = input.items.find((i) => !products.has(i.productId));
  if (missing) throw new AppError("PRODUCT_NOT_FOUND", `Product ${missing.productId} does not exist`);
  let coupon: CouponForOrder | null = null;
  if (input.userCouponId !== undefined) {
    coupon = (couponRows!.results[0] as unknown as CouponForOrder | undefined) ?? null;
    if (!coupon) throw new AppError("COUPON_NOT_USABLE", `User coupon ${input.userCouponId} does not exist`);
  }
  return { products, balance: user.balance, coupon };
}

function assertCouponUsable(coupon: CouponForOrder, userId: number, totalAmount: number, now: Date): void {
  // Another user's coupon is reported like a missing one: its existence is not the caller's business.
  if (coupon.user_id !== userId) throw new AppError("COUPON_NOT_USABLE", `User coupon ${coupon.id} does not exist`);
  if (coupon.status !== "AVAILABLE") throw new AppError("COUPON_NOT_USABLE", `User coupon ${coupon.id} is ${coupon.status}`);
  if (coupon.expires_at <= now.toISOString()) throw new AppError("COUPON_NOT_USABLE", `User coupon ${coupon.id} has expired`);
  if (totalAmount < coupon.min_order_amount) {
    throw new AppError("COUPON_NOT_USABLE", `The coupon needs an order of at least ${coupon.min_order_amount} won`);
  }
}

interface OrderToWrite extends Omit<OrderDto, "id" | "status" | "cancelledAt" | "cancelReason"> {}

/**
 * One batch: every row of the order changes together or not at all, the idempotency claim (if any)
 * included. Returns the new order's id and its JSON.
 */
async function writeOrder(
  db: D1Database,
  orderKey: string,
  order: OrderToWrite,
  claim: Claim | null,
): Promise<{ orderId: number; body: string; outbox: OutboxRow[] }> {
  const { userId, items, totalAmount, discountAmount, paidAmount, userCouponId, createdAt } = order;
  const orderId = "(SELECT id FROM orders WHERE order_key = ?)";
  // Lists are keyset-paged by created_at: a row must never be older than one already committed, or a
  // slow request (clock read early, commit late) could land behind a client's cursor. So created_at is
  // max(clock, newest in the list), and the events take the committed value.
  const orderCreatedAt = "(SELECT created_at FROM orders WHERE order_key = ?)";
  const statsEvent = { event: "PLACED", items: items.map((i) => ({ productId: i.productId, quantity: i.quantity })) };
  const exportEvent = { userId, items, totalAmount, discountAmount, paidAmount };

  const statements = [
    db
      .prepare(
        `INSERT INTO orders (order_key, user_id, status, total_amount, discount_amount, paid_amount, user_coupon_id, created_at)
         VALUES (?, ?, 'COMPLETED', ?, ?, ?, ?, max(?, coalesce((SELECT max(created_at) FROM orders WHERE user_id = ?), '')))
         RETURNING id`,
      )
      .bind(orderKey, userId, totalAmount, discountAmount, paidAmount, userCouponId, createdAt, userId),
    ...items.flatMap((i) => [
      db
        .prepare(
          `INSERT INTO order_items (order_id, product_id, name, unit_price, quantity, amount) VALUES (${orderId}, ?, ?, ?, ?, ?)`,
        )
        .bind(orderKey, i.productId, i.name, i.unitPrice, i.quantity, i.amount),
      db.prepare("UPDATE products SET stock = stock - ?, updated_at = ? WHERE id = ?").bind(i.quantity, createdAt, i.productId),
      // The product's limit is copied in, so the row's CHECK refuses a purchase past it.
      db
        .prepare(
          `INSERT INTO user_product_purchases (user_id, product_id, quantity, max_per_user)
           VALUES (?1, ?2, ?3, (SELECT max_per_user FROM products WHERE id = ?2))
           ON CONFLICT (user_id, product_id) DO UPDATE SET quantity = quantity + excluded.quantity, max_per_user = excluded.max_per_user`,
        )
        .bind(userId, i.productId, i.quantity),
    ]),
  ];
  if (paidAmount > 0) {
    statements.push(
      db.prepare("UPDATE users SET balance = balance - ?, updated_at = ? WHERE id = ?").bind(paidAmount, createdAt, userId),
      db
        .prepare(
          // Never older than the user's newest ledger row: a concurrent charge may have read its clock
          // earlier and committed first, and the newest row must carry the current balance.
          `INSERT INTO wallet_transactions (user_id, type, amount, balance_after, order_id, created_at)
           SELECT id, 'PAYMENT', ?, balance, ${orderId},
             max(?, coalesce((SELECT max(created_at) FROM wallet_transactions WHERE user_id = ?), ''))
           FROM users WHERE id = ?`,
        )
        .bind(-paidAmount, orderKey, createdAt, userId, userId),
    );
  }
  if (userCouponId !== null) {
    statements.push(
      db
        .prepare(
          `UPDATE user_coupons SET status = 'USED', used_at = ?, order_id = ${orderId}
           WHERE id = ? AND user_id = ? AND status = 'AVAILABLE'`,
        )
        .bind(createdAt, orderKey, userCouponId, userId),
    );
  }
  const events = [
    ["stats", statsEvent, `'$.date', substr(${orderCreatedAt}, 1, 10)`],
    ["export", exportEvent, `'$.completedAt', ${orderCreatedAt}`],
  ] as const;
  for (const [topic, event, committedTime] of events) {
    statements.push(
      db
        .prepare(
          `INSERT INTO outbox (order_id, topic, payload, created_at)
           VALUES (${orderId}, ?, json_set(?, '$.orderId', ${orderId}, ${committedTime}), ?) RETURNING id, topic, payload`,
        )
        .bind(orderKey, topic, JSON.stringify(event), orderKey, orderKey, createdAt),
    );
  }
  statements.push(
    db
      .prepare(
        `INSERT INTO order_exports (order_id, status, attempts, created_at, updated_at)
         SELECT ${orderId}, 'PENDING', 0, t, t FROM (SELECT max(?, coalesce((SELECT max(created_at) FROM order_exports), '')) AS t)`,
      )
      .bind(orderKey, createdAt),
  );

  const orderJson = `SELECT ${orderJsonSql("o")} FROM orders o WHERE o.order_key = ?`;
  if (claim) statements.push(completeClaim(db, claim, orderJson, orderKey));
  statements.push(db.prepare(`SELECT o.id, ${orderJsonSql("o")} AS body FROM orders o WHERE o.order_key = ?`).bind(orderKey));

  const results = await db.batch<Record<string, unknown>>(statements);
  const row = results.at(-1)!.results[0] as { id: number; body: string };
  const outbox = results.flatMap((r) => r.results).filter((r): r is OutboxRow & Record<string, unknown> => "topic" in r);
  return { orderId: row.id, body: row.body, outbox };
}

async function placedOrderJson(db: D1Database, orderKey: string): Promise<string | null> {
  const row = await db
    .prepare(`SELECT ${orderJsonSql("o")} AS body FROM orders o WHERE o.order_key = ?`)
    .bind(orderKey)
    .first<{ body: string }>();
  return row?.body ?? null;
}

const LIMIT_CHECK = "user_product_purchases_within_limit";

function translateWriteError(error: unknown): unknown {
  if (isConstraintViolation(error, "users_balance_non_negative")) {
    return new AppError("INSUFFICIENT_BALANCE", "The balance changed and no longer covers the order");
  }
  if (isConstraintViolation(error, "products_stock_non_negative")) {
    return new AppError("OUT_OF_STOCK", "A product sold out while the order was placed");
  }
  if (isConstraintViolation(error, LIMIT_CHECK)) {
    return new AppError("PURCHASE_LIMIT_EXCEEDED", "The order would pass a product's limit per customer");
  }
  if (isConstraintViolation(error, "orders.user_coupon_id")) {
    return new AppError("COUPON_NOT_USABLE", "The coupon was used by another order");
  }
  return error;
}
