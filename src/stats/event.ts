import { z } from "zod";

/**
 * An order event on the `order-stats` queue: PLACED (its units enter the sales of `date`) or CANCELLED
 * (they leave them again). `date` is always the ORDER's stat date, the UTC calendar date of its
 * `created_at`, so a cancellation takes the units off the day they were counted on. A message without
 * `event` is PLACED (messages written before cancellations existed may still be in flight). Unknown fields
 * are ignored so the producer can add some without breaking us.
 */
export const StatsEventSchema = z.object({
  event: z.enum(["PLACED", "CANCELLED"]).default("PLACED"),
  orderId: z.number().int().positive(),
  date: z.iso.date(),
  items: z
    .array(z.object({ productId: z.number().int().positive(), quantity: z.number().int().positive() }))
    .min(1)
    .max(50),
});

export type StatsEvent = z.infer<typeof StatsEventSchema>;
