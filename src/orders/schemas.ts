import { z } from "@hono/zod-openapi";
import { Name, PositiveId, Timestamp } from "../lib/openapi";

export const MAX_ORDER_LINES = 50;
export const MAX_LINE_QUANTITY = 100;

export const PlaceOrderBody = z
  .strictObject({
    userId: PositiveId.optional().openapi({ description: "Defaults to the caller; an admin must name it" }),
    items: z
      .array(z.strictObject({ productId: PositiveId, quantity: z.number().int().min(1).max(MAX_LINE_QUANTITY) }))
      .min(1)
      .max(MAX_ORDER_LINES)
      .refine((items) => new Set(items.map((i) => i.productId)).size === items.length, {
        message: "Each product may appear once",
      }),
    userCouponId: PositiveId.optional(),
  })
  .openapi("PlaceOrder");

export type PlaceOrder = z.infer<typeof PlaceOrderBody>;

export const OrderItemSchema = z.object({
  productId: z.number().int(),
  name: z.string(),
  unitPrice: z.number().int(),
  quantity: z.number().int(),
  amount: z.number().int(),
});

export const OrderSchema = z
  .object({
    id: z.number().int(),
    userId: z.number().int(),
    status: z.enum(["COMPLETED", "CANCELLED"]),
    items: z.array(OrderItemSchema),
    totalAmount: z.number().int(),
    discountAmount: z.number().int(),
    paidAmount: z.number().int(),
    userCouponId: z.number().int().nullable(),
    createdAt: Timestamp,
    cancelledAt: Timestamp.nullable(),
    cancelReason: z.string().nullable(),
  })
  .openapi("Order");

export const MAX_CANCEL_REASON = 200;

export const CancelOrderBody = z
  .strictObject({
    reason: Name(MAX_CANCEL_REASON).optional().openapi({ description: "Why, 1..200 printable characters" }),
  })
  .openapi("CancelOrder");

export type OrderDto = z.infer<typeof OrderSchema>;
export type OrderItemDto = z.infer<typeof OrderItemSchema>;
