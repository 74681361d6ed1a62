import { AppError } from "../lib/errors";
import { afterCursorSql, toPage, type Page, type PageQuery } from "../lib/pagination";
import type { Caller } from "../lib/auth";
import type { OrderDto } from "./schemas";

/**
 * An order as the API shows it, rendered by SQLite as JSON text (items in line order). Every response
 * that carries an order is this text: the one placing it, the stored idempotent replay (written in the
 * order's own batch), and the reads, so they agree byte for byte.
 */
export function orderJsonSql(alias: string): string {
  return `json_object(
    'id', ${alias}.id, 'userId', ${alias}.user_id, 'status', ${alias}.status,
    'items', json((SELECT json_group_array(json_object('productId', i.product_id, 'name', i.name,
      'unitPrice', i.unit_price, 'quantity', i.quantity, 'amount', i.amount))
      FROM (SELECT * FROM order_items WHERE order_id = ${alias}.id ORDER BY id) i)),
    'totalAmount', ${alias}.total_amount, 'discountAmount', ${alias}.discount_amount,
    'paidAmount', ${alias}.paid_amount, 'userCouponId', ${alias}.user_coupon_id, 'createdAt', ${alias}.created_at,
    'cancelledAt', ${alias}.cancelled_at, 'cancelReason', ${alias}.cancel_reason)`;
}

interface OrderJsonRow {
  id: number;
  user_id: number;
  created_at: string;
  body: string;
}

const SELECT_ORDER = `SELECT o.id, o.user_id, o.created_at, ${orderJsonSql("o")} AS body FROM orders o`;

/** Another user's order is reported as missing, not forbidden: its existence is not the caller's business. */
export async function getOrderJson(db: D1Database, caller: Caller, orderId: number): Promise<string> {
  const row = await db.prepare(`${SELECT_ORDER} WHERE o.id = ?`).bind(orderId).first<OrderJsonRow>();
  if (!row || (caller.role !== "admin" && row.user_id !== caller.userId)) {
    throw new AppError("ORDER_NOT_FOUND", `Order ${orderId} does not exist`);
  }
  return row.body;
}

export async function listOrders(db: D1Database, userId: number, page: PageQuery): Promise<Page<OrderDto>> {
  const list = `orders:${userId}`;
  const after = afterCursorSql("o.created_at", "o.id", page.cursor, list);
  const { results } = await db
    .prepare(`${SELECT_ORDER} WHERE o.user_id = ? ${after ? `AND ${after.sql}` : ""} ORDER BY o.created_at DESC, o.id DESC LIMIT ?`)
    .bind(userId, ...(after?.params ?? []), page.limit + 1)
    .all<OrderJsonRow>();
  return toPage(
    results.map((r) => ({ id: r.id, createdAt: r.created_at, body: r.body })),
    page.limit,
    list,
    (r) => JSON.parse(r.body) as OrderDto,
  );
}
