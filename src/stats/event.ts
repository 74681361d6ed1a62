import { z } from "zod";

/**
 * "Order completed", as order creation puts it on the `order-stats` queue. `date` is the UTC calendar
 * date the sale counts for. Unknown fields are ignored so the producer can add some without breaking us.
 */
export const OrderCompletedEventSchema = z.object({
  orderId: z.number().int().positive(),
  date: z.iso.date(),
  items: z
    .array(z.object({ productId: z.number().int().positive(), quantity: z.number().int().positive() }))
    .min(1)
    .max(50),
});

export type OrderCompletedEvent = z.infer<typeof OrderCompletedEventSchema>;
