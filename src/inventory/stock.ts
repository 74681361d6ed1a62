import { AppError, ORDER_OUTCOME_UNKNOWN, OutcomeUnknownError } from "../lib/errors";
import { KeyInUse } from "../lib/idempotency";
import { SoldOutMarks } from "../lib/sold-out-marks";
import { describeError, log } from "../lib/log";
import { currentRequestId } from "../lib/request-context";
import type { SingleProductOrder } from "./order-group";
import type { AdjustResult, ProductStock, ReserveResult, StockPatch, StockRefusal } from "./product-stock";

// The Worker's side of the per-product stock objects. A call that throws (the object overloaded, reset
// or unreachable) is answered 503 SERVICE_UNAVAILABLE, never a 500; and what the call may have taken
// is given back, since its reply, not its effect, may be what was lost.

export interface StockLine {
  productId: number;
  quantity: number;
}

/**
 * Products this isolate saw sold out, and until when it refuses their one-product orders itself, without the
 * object call (most of a drop's requests are such refusals): unkeyed ones here, and keyed ones in the route,
 * before their key has a row. Stock that comes back stays hidden at most this long; this isolate forgets the
 * mark at once when it gives units back itself (not when the object's order group does).
 */
const SOLD_OUT_MARK_MS = 1_000;
const soldOut = new SoldOutMarks(SOLD_OUT_MARK_MS, (productId) => new AppError("OUT_OF_STOCK", `Product ${productId} is sold out`));

/** The refusal for a product this isolate saw sold out within the last second, or null. */
export const soldOutRefusal = (productId: number): AppError | null => soldOut.refusal(productId);
const forgetSoldOut = (lines: StockLine[]) => lines.forEach((l) => soldOut.forget(l.productId));

function stockObject(env: Env, productId: number) {
  return env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));
}

async function callObject<T>(productId: number, call: () => Promise<T>, detail = "Stock could not be checked right now; retry shortly"): Promise<T> {
  try {
    return await call();
  } catch (error) {
    log("error", "stock object call failed", { productId, ...describeError(error) });
    throw new AppError("SERVICE_UNAVAILABLE", detail);
  }
}

/** When an order is refused for several reasons, the first of these is reported (the seed's order). */
const REFUSAL_ORDER: StockRefusal[] = ["PRODUCT_NOT_FOUND", "OUT_OF_STOCK", "PURCHASE_LIMIT_EXCEEDED"];

/**
 * Reserves every line of `userId`'s order, product by product in id order (two orders never hold each
 * other's last units); all or nothing: on the first refusal or error, what was taken is given back (a
 * line whose call threw included: its reply may be all that was lost; see `giveBack` for `shared`) and
 * the refusal is thrown. A refusal with lines still unasked asks their objects (without taking anything)
 * whether one of them has a reason that comes first.
 */
export async function reserveStock(env: Env, orderKey: string, lines: StockLine[], userId: number, shared = false): Promise<void> {
  const sorted = [...lines].sort((a, b) => a.productId - b.productId);
  // A line is owed a release once asked, unless the object answered that it took nothing.
  const owed: StockLine[] = [];
  try {
    for (const [i, line] of sorted.entries()) {
      owed.push(line);
      const result = await callObject(line.productId, async (): Promise<ReserveResult> =>
        stockObject(env, line.productId).reserve(line.productId, orderKey, line.quantity, userId, currentRequestId()),
      );
      if (!result.ok) {
        owed.pop();
        const first = await firstRefusal(env, line, result, sorted.slice(i + 1), userId);
        throw refusalError(first.line, first.result);
      }
    }
  } catch (error) {
    await giveBack(env, orderKey, owed, shared);
    throw error;
  }
}

/**
 * The units an order that failed before its write holds go back: released now, or, when an earlier run of
 * the same keyed order may share them and still commit (`shared`: it crashed), settled against D1 soon.
 */
export function giveBack(env: Env, orderKey: string, lines: StockLine[], shared: boolean): Promise<void> {
  return shared ? settleStockSoon(env, orderKey, lines) : releaseStock(env, orderKey, lines);
}

type Refused = Extract<ReserveResult, { ok: false }>;

async function firstRefusal(env: Env, line: StockLine, result: Refused, rest: StockLine[], userId: number) {
  let first = { line, result };
  for (const other of rest) {
    if (first.result.reason === REFUSAL_ORDER[0]) break;
    const answer = await callObject(other.productId, async (): Promise<ReserveResult> =>
      stockObject(env, other.productId).check(other.productId, other.quantity, userId),
    );
    if (!answer.ok && REFUSAL_ORDER.indexOf(answer.reason) < REFUSAL_ORDER.indexOf(first.result.reason)) {
      first = { line: other, result: answer };
    }
  }
  return first;
}

function refusalError(line: StockLine, result: Refused): AppError {
  switch (result.reason) {
    case "PRODUCT_NOT_FOUND":
      return new AppError("PRODUCT_NOT_FOUND", `Product ${line.productId} does not exist`);
    case "OUT_OF_STOCK":
      return new AppError("OUT_OF_STOCK", `Product ${line.productId} has ${result.available} left, ${line.quantity} asked`);
    case "PURCHASE_LIMIT_EXCEEDED":
      return new AppError(
        "PURCHASE_LIMIT_EXCEEDED",
        `Product ${line.productId} allows ${result.maxPerUser} per customer; ${result.held} already held, ${line.quantity} asked`,
      );
  }
}

/**
 * An order of one product, placed by that product's object from reservation to commit (group commit).
 * Returns the order as JSON text, or throws its refusal. A call that throws before reaching the object
 * (overloaded) is a plain 503; any other may have placed the order, so its outcome is unknown.
 */
export async function placeSingleProductOrder(env: Env, line: StockLine, order: SingleProductOrder): Promise<{ body: string; stored: boolean }> {
  // Only an unkeyed order is answered from the mark here. A keyed one was checked against it by the route,
  // before its key had a row; once claimed, it always asks: an earlier run of its key may have placed it (to be
  // replayed), or may be what made the product look sold out (its units given back since).
  const marked = order.claim === null && !order.claimToMake ? soldOutRefusal(line.productId) : null;
  if (marked) throw marked;
  let result: Awaited<ReturnType<DurableObjectStub<ProductStock>["placeOrder"]>>;
  try {
    const stub = stockObject(env, line.productId);
    // Its own method, so that an object still running the code before it (for a while after a deploy)
    // refuses the call rather than place the order without its key: the Worker then claims the key itself.
    result = await (order.claimToMake ? stub.placeOrderClaiming(line.productId, order) : stub.placeOrder(line.productId, order));
  } catch (error) {
    if (order.claimToMake && isMissingMethod(error)) throw new KeyInUse();
    log("error", "stock object order call failed", { productId: line.productId, ...describeError(error) });
    if ((error as { overloaded?: unknown } | null)?.overloaded === true) {
      throw new AppError("SERVICE_UNAVAILABLE", "The product is busy; retry shortly");
    }
    throw new OutcomeUnknownError(ORDER_OUTCOME_UNKNOWN, { cause: error });
  }
  // The claim the object made for a key the Worker did not claim: the Worker finishes it, whatever follows.
  if (order.claimToMake && result.outcome?.claim) order.claimToMake.made = result.outcome.claim;
  if (result.outcome?.ok === false && result.outcome.keyInUse) throw new KeyInUse(result.outcome.keyRow);
  if (!result.stock.ok) {
    if (result.stock.reason === "OUT_OF_STOCK" && result.stock.available === 0) {
      soldOut.mark(line.productId);
    }
    throw refusalError(line, result.stock);
  }
  const outcome = result.outcome!;
  if (outcome.ok) return { body: outcome.body, stored: outcome.stored };
  if (outcome.outcomeUnknown) throw new OutcomeUnknownError(outcome.detail);
  throw new AppError(outcome.code, outcome.detail);
}

/**
 * The error of an RPC call to a method the object's code does not have (yet): workerd answers it with
 * `TypeError: The RPC receiver does not implement the method "<name>".` before running anything.
 */
function isMissingMethod(error: unknown): boolean {
  return error instanceof Error && error.message.includes("does not implement the method");
}

/**
 * Tells each product's object that a cancellation will give its lines back. The units become sellable
 * only when the cancellation is committed (commitStock with the same key, or the object's alarm finding
 * it in D1), so a restock can never offer stock D1 does not have yet.
 */
export async function announceRestock(env: Env, restockKey: string, lines: StockLine[], userId: number): Promise<void> {
  for (const line of lines) {
    await callObject(line.productId, () =>
      stockObject(env, line.productId).announceRestock(line.productId, restockKey, line.quantity, userId),
    );
  }
}

/** Best effort: a release that fails is settled by the object's alarm when the reservation expires. */
export async function releaseStock(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  forgetSoldOut(lines);
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).release(l.productId, orderKey)));
}

/** After the order's (or cancellation's) batch committed. A failure here is healed by the object's alarm. */
export async function commitStock(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  // A cancellation's commit gives units back.
  forgetSoldOut(lines);
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).commit(l.productId, orderKey)));
}

/** After a write whose outcome is unknown: each object settles the order against D1 within seconds. */
export async function settleStockSoon(env: Env, orderKey: string, lines: StockLine[]): Promise<void> {
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).settleSoon(l.productId, orderKey)));
}

/** D1 refused stock an object offered: those objects take D1's numbers again. */
export async function resyncStock(env: Env, lines: StockLine[]): Promise<void> {
  await Promise.allSettled(lines.map((l) => stockObject(env, l.productId).resync(l.productId, currentRequestId())));
}

/**
 * Admin stock changes go through the product's object, which also writes D1. A change is not idempotent, and
 * one that fails may have reached D1 with its reply lost: the 503 says to read the product before retrying.
 */
export async function adjustStock(env: Env, productId: number, patch: StockPatch): Promise<AdjustResult> {
  forgetSoldOut([{ productId, quantity: 0 }]);
  return callObject(
    productId,
    async (): Promise<AdjustResult> => stockObject(env, productId).adjust(productId, patch),
    "The change may or may not have been applied; read the product before retrying it",
  );
}
