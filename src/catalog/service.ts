import { desc, eq, sql } from "drizzle-orm";
import { products } from "../db/schema";
import { AppError } from "../lib/errors";
import { afterCursor, toPage, type Page, type PageQuery } from "../lib/pagination";
import type { Clock } from "../lib/clock";
import type { Db } from "../env";
import { catalogVersion, invalidateCatalog, readThrough, type CachePolicy, type WaitUntil } from "./cache";
import { adjustStock } from "../inventory/stock";
import type { CreateProduct, UpdateProduct } from "./schemas";

/**
 * A product-list page is served at most 60 s after it was read from D1 (the seed's 60 s; also KV's minimum
 * TTL), and refreshed in the background once it is 30 s old, so a busy list rarely waits for D1.
 */
export const PRODUCT_LIST_CACHE: CachePolicy = { freshSeconds: 30, ttlSeconds: 60 };

export type ProductRow = Omit<typeof products.$inferSelect, "adminWriteId">;

export interface ProductDto {
  id: number;
  name: string;
  price: number;
  stock: number;
  maxPerUser: number | null;
  createdAt: string;
  updatedAt: string;
}

export const toProductDto = (p: ProductRow): ProductDto => ({
  id: p.id,
  name: p.name,
  price: p.price,
  stock: p.stock,
  maxPerUser: p.maxPerUser,
  createdAt: p.createdAt,
  updatedAt: p.updatedAt,
});

/** One product, read from D1 on every call (the detail is never stale on stock). Plain SQL: a hot read. */
export async function getProduct(d1: D1Database, productId: number): Promise<ProductDto> {
  const row = await d1
    .prepare(
      `SELECT id, name, price, stock, max_per_user AS maxPerUser, created_at AS createdAt, updated_at AS updatedAt
       FROM products WHERE id = ?`,
    )
    .bind(productId)
    .first<ProductRow>();
  if (!row) throw new AppError("PRODUCT_NOT_FOUND", `Product ${productId} does not exist`);
  return toProductDto(row);
}

/** Products newest first, by (created_at, id) descending. */
export async function listProducts(db: Db, page: PageQuery): Promise<Page<ProductDto>> {
  const rows = await db
    .select()
    .from(products)
    .where(afterCursor(products.createdAt, products.id, page.cursor, "products"))
    .orderBy(desc(products.createdAt), desc(products.id))
    .limit(page.limit + 1);
  return toPage(rows, page.limit, "products", toProductDto);
}

/**
 * A product-list page as JSON text. First pages (the hot ones) come from KV while the catalog version is
 * unchanged; later pages go to D1, so arbitrary cursors cannot fill KV with keys.
 */
export async function productListBody(
  db: Db,
  cache: KVNamespace,
  page: PageQuery,
  waitUntil: WaitUntil,
): Promise<string> {
  const load = () => listProducts(db, page);
  if (page.cursor !== undefined) return JSON.stringify(await load());
  const version = await catalogVersion(cache);
  if (version === null) return JSON.stringify(await load());
  return readThrough(cache, `catalog:${version}:products:${page.limit}:first`, PRODUCT_LIST_CACHE, load, waitUntil);
}

export async function createProduct(db: Db, cache: KVNamespace, clock: Clock, input: CreateProduct): Promise<ProductDto> {
  // The list is keyset-paged newest first, so a product must never be older than one already committed,
  // or a request that read the clock early and committed late would land behind a client's cursor. The
  // newest is read inside the INSERT (one statement, so atomic); both columns get the same value.
  const now = clock.now().toISOString();
  const createdAt = sql<string>`max(${now}, coalesce((SELECT max(${products.createdAt}) FROM ${products}), ''))`;
  const [row] = await db
    .insert(products)
    .values({ ...input, createdAt, updatedAt: createdAt })
    .returning();
  await invalidateCatalog(cache);
  return toProductDto(row!);
}

/**
 * Renames, reprices, restocks and limits. A stock or limit change goes through the product's stock object,
 * which owns both decisions (it must not hand out stock reserved by orders in flight, and must refuse by the
 * new limit from the moment it is set) and writes the whole change to D1; D1's CHECKs still back it.
 * Without either the row is updated in D1 directly.
 */
export async function updateProduct(
  db: Db,
  env: Env,
  clock: Clock,
  productId: number,
  input: UpdateProduct,
): Promise<ProductDto> {
  const updatedAt = clock.now().toISOString();
  let product: ProductDto;
  if (input.stockDelta !== undefined || input.maxPerUser !== undefined) {
    const result = await adjustStock(env, productId, { ...input, stockDelta: input.stockDelta ?? 0, updatedAt });
    if (!result.ok) {
      throw result.reason === "OUT_OF_STOCK"
        ? new AppError("OUT_OF_STOCK", "The stock would go below zero or into stock reserved by orders in flight")
        : new AppError("PRODUCT_NOT_FOUND", `Product ${productId} does not exist`);
    }
    product = toProductDto(result.product);
  } else {
    const [row] = await db
      .update(products)
      .set({ name: input.name, price: input.price, updatedAt })
      .where(eq(products.id, productId))
      .returning();
    if (!row) throw new AppError("PRODUCT_NOT_FOUND", `Product ${productId} does not exist`);
    product = toProductDto(row);
  }
  await invalidateCatalog(env.CACHE);
  return product;
}
