import { z } from "@hono/zod-openapi";
import { Name, Timestamp } from "../lib/openapi";

export const MAX_PRICE = 10_000_000;
export const MAX_STOCK = 1_000_000;

export const ProductSchema = z
  .object({
    id: z.number().int(),
    name: z.string(),
    price: z.number().int().openapi({ description: "Integer won" }),
    stock: z.number().int(),
    maxPerUser: z
      .number()
      .int()
      .nullable()
      .openapi({ description: "At most this many units per customer over their non-cancelled orders; null: no limit" }),
    createdAt: Timestamp,
    updatedAt: Timestamp,
  })
  .openapi("Product");

const name = Name(200);
const price = z.number().int().min(0).max(MAX_PRICE).openapi({ description: "Integer won, 0..10,000,000" });
const maxPerUser = z
  .number()
  .int()
  .min(1)
  .max(MAX_STOCK)
  .nullable()
  .openapi({ description: "Units per customer over their non-cancelled orders, 1..1,000,000; null: no limit" });

export const CreateProductBody = z
  .strictObject({
    name,
    price,
    stock: z.number().int().min(0).max(MAX_STOCK),
    maxPerUser: maxPerUser.optional(),
  })
  .openapi("CreateProduct");

export const UpdateProductBody = z
  .strictObject({
    name: name.optional(),
    price: price.optional(),
    stockDelta: z
      .number()
      .int()
      .min(-MAX_STOCK)
      .max(MAX_STOCK)
      .optional()
      .openapi({ description: "Added to the stock; the stock never goes below 0 (400 OUT_OF_STOCK)" }),
    maxPerUser: maxPerUser.optional().openapi({ description: "The new limit per customer, applied at once; null removes it" }),
  })
  .refine((b) => b.name !== undefined || b.price !== undefined || b.stockDelta !== undefined || b.maxPerUser !== undefined, {
    message: "Give at least one of name, price, stockDelta, maxPerUser",
  })
  .openapi("UpdateProduct");

export type CreateProduct = z.infer<typeof CreateProductBody>;
export type UpdateProduct = z.infer<typeof UpdateProductBody>;

export const PopularSchema = z
  .object({
    items: z.array(
      z.object({
        rank: z.number().int().openapi({ description: "1 for the best seller" }),
        product: ProductSchema,
        quantitySold: z.number().int(),
      }),
    ),
    from: z.iso.date().openapi({ description: "First UTC date of the window (today - 3 days)", example: "2026-11-20" }),
    to: z.iso.date().openapi({ description: "Last UTC date of the window (today)", example: "2026-11-23" }),
    generatedAt: Timestamp,
  })
  .openapi("PopularProducts");
