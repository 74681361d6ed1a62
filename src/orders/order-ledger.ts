import { isConstraintViolation } from "../db/errors";
import { AppError } from "../lib/errors";
import { completeClaim, type Claim } from "../lib/idempotency";
import { discountFor, type DiscountType } from "../lib/money";
import type { OutboxRow } from "./outbox";
import { orderJsonSql } from "./queries";
import type { OrderDto } from "./schemas";

// How an order is priced and written to D1, shared by the two paths that place orders: the Worker's (an
// order over several products) and the product stock object's group commit (an order of one product).

export interface ProductPrice {
  id: number;
  name: string;
  price: number;
}

export interface CouponForOrder {
  id: number;
  user_id: number;
  status: string;
  expires_at: string;
  discount_type: DiscountType;
  discount_value: number;
  min_order_amount: number;
  max_discount_amount: number | null;
}

/** The user coupon as an order reads it, by `uc.id` (a bound parameter or a json_each value). */
export const COUPON_FOR_ORDER_SQL = `SELECT uc.id, uc.user_id, uc.status, uc.expires_at, c.discount_type, c.discount_value,
    c.min_order_amount, c.max_discount_amount
  FROM user_coupons uc JOIN coupons c ON c.id = uc.coupon_id`;

export interface OrderToWrite extends Omit<OrderDto, "id" | "status" | "cancelledAt" | "cancelReason"> {
  /** The placing request's id, stored in the order's queue messages so the order can be followed to its export. */
  requestId?: string;
}

/**
 * Prices the lines and checks what needs D1's data, in the contract's order (stock and limits were
 * checked by the stock objects already): the coupon, then the balance. Throws the refusal.
 */
export function priceOrder(
  userId: number,
  lines: { productId: number; quantity: number }[],
  products: Map<number, ProductPrice>,
  coupon: CouponForOrder | null,
  balance: number,
  now: Date,
): OrderToWrite {
  const items = lines.map((line) => {
    const product = products.get(line.productId);
    if (!product) throw new AppError("PRODUCT_NOT_FOUND", `Product ${line.productId} does not exist`);
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
  return { userId, items, totalAmount, discountAmount, paidAmount, userCouponId: coupon?.id ?? null, createdAt: now.toISOString() };
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

/**
 * The statements that write one order: every row of it, the idempotency claim (if any) included. Run
 * alone or with other orders' in one batch, they change together or not at all; the last one selects the
 * order as JSON (see writtenOrder).
 */
export function orderStatements(db: D1Database, orderKey: string, order: OrderToWrite, claim: Claim | null): D1PreparedStatement[] {
  const { userId, items, totalAmount, discountAmount, paidAmount, userCouponId, createdAt } = order;
  const orderId = "(SELECT id FROM orders WHERE order_key = ?)";
  // Lists are keyset-paged by created_at: a row must never be older than one already committed, or a
  // slow request (clock read early, commit late) could land behind a client's cursor. So created_at is
  // max(clock, newest in the list), and the events take the committed value.
  const orderCreatedAt = "(SELECT created_at FROM orders WHERE order_key = ?)";
  const traced = order.requestId ? { requestId: order.requestId } : {};
  const statsEvent = { event: "PLACED", items: items.map((i) => ({ productId: i.productId, quantity: i.quantity })), ...traced };
  const exportEvent = { userId, items, totalAmount, discountAmount, paidAmount, ...traced };

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

  return statements;
}

export interface WrittenOrder {
  orderId: number;
  body: string;
  outbox: OutboxRow[];
}

/** The order written by one order's statements, from their results (in order). */
export function writtenOrder(results: D1Result<Record<string, unknown>>[]): WrittenOrder {
  const row = results.at(-1)!.results[0] as { id: number; body: string };
  const outbox = results.flatMap((r) => r.results).filter((r): r is OutboxRow & Record<string, unknown> => "topic" in r);
  return { orderId: row.id, body: row.body, outbox };
}

/** One order in its own batch. */
export async function writeOrder(db: D1Database, orderKey: string, order: OrderToWrite, claim: Claim | null): Promise<WrittenOrder> {
  return writtenOrder(await db.batch<Record<string, unknown>>(orderStatements(db, orderKey, order, claim)));
}

export async function placedOrderJson(db: D1Database, orderKey: string): Promise<string | null> {
  const row = await db
    .prepare(`SELECT ${orderJsonSql("o")} AS body FROM orders o WHERE o.order_key = ?`)
    .bind(orderKey)
    .first<{ body: string }>();
  return row?.body ?? null;
}

export const LIMIT_CHECK = "user_product_purchases_within_limit";

export function translateWriteError(error: unknown): unknown {
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
