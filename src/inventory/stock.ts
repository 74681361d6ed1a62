import { AppError } from "../lib/errors";
import { describeError, log } from "../lib/log";
import type { AdjustResult, ReserveResult, StockPatch } from "./product-stock";

// The Worker's side of the per-product stock objects. A call that throws (the object overloaded, reset
// or unreachable) is answered 503 SERVICE_UNAVAILABLE, never a 500; and what the call may have taken
// is given back, since its reply, not its effect, may be what was lost.

export interface StockLine {
  productId: number;
  quantity: number;
}

function stockObject(env: Env, productId: number) {
  return env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));
}

async function callObject<T>(productId: number, call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (error) {
    log("error", "stock object call failed", { productId, ...describeError(error) });
    throw new AppError("SERVICE_UNAVAILABLE", "Stock could not be checked right now; retry shortly");
  }
}

/**
 * Reserves every line for the order, product by product in id order (two orders never hold each
 * other's last units); all or nothing: on the first refusal or error, what was taken is released (a
 * line whose call threw included: its reply may be all that was lost) and the refusal is thrown.
 */
export async function reserveStock(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  // A line is owed a release once asked, unless the object answered that it took nothing.
  const owed: StockLine[] = [];
  try {
    for (const line of [...lines].sort((a, b) => a.productId - b.productId)) {
      owed.push(line);
      const result: ReserveResult = await callObject(line.productId, async () =>
        stockObject(env, line.productId).reserve(line.productId, orderKey, line.quantity),
      );
      if (!result.ok) {
        owed.pop();
        throw new AppError(
          result.reason,
          result.reason === "OUT_OF_STOCK"
            ? `Product ${line.productId} has ${result.available} left, ${line.quantity} asked`
            : `Product ${line.productId} does not exist`,
        );
      }
    }
  } catch (error) {
    await releaseStock(env, orderKey, owed);
    throw error;
  }
}

/** Best effort: a release that fails is settled by the object's alarm when the reservation expires. */
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

/** D1 refused stock an object offered: those objects take D1's numbers again. */
export async function resyncStock(env: Env, lines: StockLine[]): Promise<void> {
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).resync(l.productId)));
}

/** Admin stock changes go through the product's object, which also writes D1. */
export async function adjustStock(env: Env, productId: number, patch: StockPatch): Promise<AdjustResult> {
  return callObject(productId, async (): Promise<AdjustResult> => stockObject(env, productId).adjust(productId, patch));
}
