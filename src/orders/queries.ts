import { AppError } from "../lib/errors";
import { afterCursorSql, toPage, type Page, type PageQuery } from "../lib/pagination";
import type { Caller } from "../lib/auth";
import type { OrderDto } from "./schemas";

interface OrderRow {
  id: number;
  user_id: number;
  total_amount: number;
  discount_amount: number;
  paid_amount: number;
  user_coupon_id: number | null;
  created_at: string;
  items: string;
}

// Orders come with their items in one query (json_group_array), in line order.
const ORDER_SELECT = `
  SELECT o.id, o.user_id, o.total_amount, o.discount_amount, o.paid_amount, o.user_coupon_id, o.created_at,
    (SELECT json_group_array(json_object('productId', i.product_id, 'name', i.name, 'unitPrice', i.unit_price,
       'quantity', i.quantity, 'amount', i.amount)) FROM (SELECT * FROM order_items WHERE order_id = o.id ORDER BY id) i) AS items
  FROM orders o`;

const toOrderDto = (row: OrderRow): OrderDto => ({
  id: row.id,
  userId: row.user_id,
  status: "COMPLETED",
  items: JSON.parse(row.items),
  totalAmount: row.total_amount,
  discountAmount: row.discount_amount,
  paidAmount: row.paid_amount,
  userCouponId: row.user_coupon_id,
  createdAt: row.created_at,
});

/** Another user's order is reported as missing, not forbidden: its existence is not the caller's business. */
export async function getOrder(db: D1Database, caller: Caller, orderId: number): Promise<OrderDto> {
  const row = await db.prepare(`${ORDER_SELECT} WHERE o.id = ?`).bind(orderId).first<OrderRow>();
  if (!row || (caller.role !== "admin" && row.user_id !== caller.userId)) {
    throw new AppError("ORDER_NOT_FOUND", `Order ${orderId} does not exist`);
  }
  return toOrderDto(row);
}

export async function listOrders(db: D1Database, userId: number, page: PageQuery): Promise<Page<OrderDto>> {
  const after = afterCursorSql("o.created_at", "o.id", page.cursor);
  const { results } = await db
    .prepare(`${ORDER_SELECT} WHERE o.user_id = ? ${after ? `AND ${after.sql}` : ""} ORDER BY o.created_at DESC, o.id DESC LIMIT ?`)
    .bind(userId, ...(after?.params ?? []), page.limit + 1)
    .all<OrderRow>();
  return toPage(
    results.map((r) => ({ ...r, createdAt: r.created_at })),
    page.limit,
    toOrderDto,
  );
}
