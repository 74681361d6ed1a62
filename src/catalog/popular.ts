import { and, asc, desc, eq, gte, lte, sql } from "drizzle-orm";
import { productSalesDaily, products } from "../db/schema";
import { DAY_MS, utcDate } from "../lib/clock";
import type { Db } from "../env";
import { readThrough, type CachePolicy, type WaitUntil } from "./cache";
import { toProductDto, type ProductDto } from "./service";

/** The seed's choice: the ranking may be up to 30 minutes old; it is refreshed in the background after 15. */
export const POPULAR_CACHE: CachePolicy = { freshSeconds: 15 * 60, ttlSeconds: 30 * 60 };
export const POPULAR_SIZE = 5;
/** `stat_date >= today - 3 days`, today included: four UTC dates. */
const WINDOW_DAYS_BACK = 3;

export interface SalesWindow {
  from: string;
  to: string;
}

export interface PopularRanking extends SalesWindow {
  items: { rank: number; product: ProductDto; quantitySold: number }[];
  generatedAt: string;
}

/** The UTC dates the ranking covers at `now`: from three days ago through today. */
export function salesWindow(now: Date): SalesWindow {
  return { from: utcDate(new Date(now.getTime() - WINDOW_DAYS_BACK * DAY_MS)), to: utcDate(now) };
}

/** Top products by quantity sold within the window; ties go to the lower product id. */
export async function rankPopular(db: Db, window: SalesWindow, now: Date): Promise<PopularRanking> {
  const quantitySold = sql<number>`sum(${productSalesDaily.quantity})`.mapWith(Number);
  const rows = await db
    .select({ product: products, quantitySold })
    .from(productSalesDaily)
    .innerJoin(products, eq(products.id, productSalesDaily.productId))
    .where(and(gte(productSalesDaily.statDate, window.from), lte(productSalesDaily.statDate, window.to)))
    .groupBy(products.id)
    .having(sql`${quantitySold} > 0`)
    .orderBy(desc(quantitySold), asc(products.id))
    .limit(POPULAR_SIZE);
  return {
    items: rows.map((row, i) => ({ rank: i + 1, product: toProductDto(row.product), quantitySold: row.quantitySold })),
    ...window,
    generatedAt: now.toISOString(),
  };
}

/**
 * The ranking as JSON text, cached per window end date so a new UTC day starts a new entry. Every reader
 * misses that entry at 00:00 UTC at once; the cache's single flight makes it one query per isolate.
 */
export async function popularBody(db: Db, cache: KVNamespace, now: Date, waitUntil: WaitUntil): Promise<string> {
  const window = salesWindow(now);
  return readThrough(cache, `popular:${window.to}`, POPULAR_CACHE, () => rankPopular(db, window, now), waitUntil);
}
