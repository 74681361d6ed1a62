import { z } from "zod";
import type { OrderEvent } from "../orders/outbox";

/** What the data platform receives for each completed order (the contract's export body). */
export const OrderExportEvent = z.object({
  orderId: z.number().int().positive(),
  userId: z.number().int().positive(),
  items: z.array(
    z.object({
      productId: z.number().int(),
      name: z.string(),
      unitPrice: z.number().int(),
      quantity: z.number().int(),
      amount: z.number().int(),
    }),
  ),
  totalAmount: z.number().int(),
  discountAmount: z.number().int(),
  paidAmount: z.number().int(),
  completedAt: z.string(),
});

export type OrderExportEvent = z.infer<typeof OrderExportEvent>;

/** What the data platform receives for each cancelled order (the contract's cancellation body). */
export const OrderCancellationExport = z.object({
  orderId: z.number().int().positive(),
  userId: z.number().int().positive(),
  status: z.literal("CANCELLED"),
  refundedAmount: z.number().int().nonnegative(),
  cancelledAt: z.iso.datetime(),
});

export type OrderCancellationExport = z.infer<typeof OrderCancellationExport>;

/** Each event's body has its own schema. */
export const exportSchemaOf = { PLACED: OrderExportEvent, CANCELLED: OrderCancellationExport } satisfies Record<OrderEvent, z.ZodType>;

/** The contract's Idempotency-Key: one per order and event, so the platform keeps each once. */
export const idempotencyKeyOf = (orderId: number, event: OrderEvent) =>
  event === "PLACED" ? `order-${orderId}` : `order-${orderId}-cancel`;
