import { eq, sql } from "drizzle-orm";
import { products } from "../db/schema";
import { isConstraintViolation } from "../db/errors";
import { AppError } from "../lib/errors";
import type { Clock } from "../lib/clock";
import type { Db } from "../env";
import type { CreateProduct, UpdateProduct } from "./schemas";

export type ProductRow = typeof products.$inferSelect;

export interface ProductDto {
  id: number;
  name: string;
  price: number;
  stock: number;
  createdAt: string;
  updatedAt: string;
}

export const toProductDto = (p: ProductRow): ProductDto => ({
  id: p.id,
  name: p.name,
  price: p.price,
  stock: p.stock,
  createdAt: p.createdAt,
  updatedAt: p.updatedAt,
});

export async function getProduct(db: Db, productId: number): Promise<ProductDto> {
  const row = await db.query.products.findFirst({ where: eq(products.id, productId) });
  if (!row) throw new AppError("PRODUCT_NOT_FOUND", `Product ${productId} does not exist`);
  return toProductDto(row);
}

export async function createProduct(db: Db, clock: Clock, input: CreateProduct): Promise<ProductDto> {
  const now = clock.now().toISOString();
  const [row] = await db
    .insert(products)
    .values({ ...input, createdAt: now, updatedAt: now })
    .returning();
  return toProductDto(row!);
}

/**
 * Renames, reprices and restocks. The stock change is one atomic `stock = stock + delta`;
 * the table's CHECK (stock >= 0) refuses a change that would go below zero.
 */
export async function updateProduct(db: Db, clock: Clock, productId: number, input: UpdateProduct): Promise<ProductDto> {
  const set: Partial<typeof products.$inferInsert> = { updatedAt: clock.now().toISOString() };
  if (input.name !== undefined) set.name = input.name;
  if (input.price !== undefined) set.price = input.price;
  if (input.stockDelta !== undefined) set.stock = sql<number>`${products.stock} + ${input.stockDelta}` as unknown as number;
  try {
    const [row] = await db.update(products).set(set).where(eq(products.id, productId)).returning();
    if (!row) throw new AppError("PRODUCT_NOT_FOUND", `Product ${productId} does not exist`);
    return toProductDto(row);
  } catch (error) {
    if (isConstraintViolation(error, "products_stock_non_negative")) {
      throw new AppError("OUT_OF_STOCK", "The stock would go below zero");
    }
    throw error;
  }
}
