import { AppError } from "../lib/errors";
import type { AdjustResult, StockPatch } from "./product-stock";

// The Worker's side of the per-product stock objects.

export interface StockLine {
  productId: number;
  quantity: number;
}

function stockObject(env: Env, productId: number) {
  return env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));
}

/**
 * Reserves every line for the order, product by product in id order; all or nothing: on the first
 * refusal (or error) what was already reserved is released and the refusal is thrown.
 */
export async function reserveStock(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  const reserved: StockLine[] = [];
  try {
    for (const line of [...lines].sort((a, b) => a.productId - b.productId)) {
      const result = await stockObject(env, line.productId).reserve(line.productId, orderKey, line.quantity);
      if (!result.ok) {
        throw new AppError(
          result.reason,
          result.reason === "OUT_OF_STOCK"
            ? `Product ${line.productId} has ${result.available} left, ${line.quantity} asked`
            : `Product ${line.productId} does not exist`,
        );
      }
      reserved.push(line);
    }
  } catch (error) {
    await releaseStock(env, orderKey, reserved);
    throw error;
  }
}

export async function releaseStock(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).release(l.productId, orderKey)));
}

/** After the order's batch committed. A failure here is healed by the object's settlement alarm. */
export async function commitStock(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).commit(l.productId, orderKey)));
}

/** After a write whose outcome is unknown: each object settles the order against D1 within seconds. */
export async function settleStockSoon(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).settleSoon(l.productId, orderKey)));
}

/** Admin stock changes go through the product's object, which also writes D1. */
export async function adjustStock(env: Env, productId: number, patch: StockPatch): Promise<AdjustResult> {
  return stockObject(env, productId).adjust(productId, patch);
}
