import { z } from "zod";

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
