import type { ProductStock } from "../inventory/product-stock";
import { Check, reportNotReached, walkPages, type AuditLimits, type CheckResult } from "./check";
import { compareObjects, readValues, type ObjectAudit } from "./objects";

// Stock is never negative, and each product's stock object agrees with D1: with no entry open its stock
// equals D1's; with entries open (orders or cancellations on their way) it is only held to its own
// invariant, stock - reserved <= D1's stock, and counted busy.
const PRODUCTS_PAGE = "SELECT id, stock FROM products WHERE id > ?1 ORDER BY id LIMIT ?2";

const STOCKS = "SELECT id, stock AS value FROM products WHERE id IN (SELECT value FROM json_each(?))";

type StockView = { stock: number; reserved: number; openEntries: number };

export async function auditStock(db: D1Database, stocks: DurableObjectNamespace<ProductStock>, limits: AuditLimits): Promise<CheckResult> {
  const check = new Check("stock");
  const stockAudit: ObjectAudit<StockView> = {
    // The object's name, as the inventory client addresses it.
    ask: (id) => stocks.getByName(String(id)).auditView(id),
    judge: (view, d1) => {
      if (view.openEntries > 0) return view.stock - view.reserved <= d1 ? "busy" : "disagrees";
      return view.stock === d1 ? "agrees" : "disagrees";
    },
    reread: (ids) => readValues(db, STOCKS, ids),
  };
  let asked = 0;
  const stoppedAfter = await walkPages(limits, async (afterId, limit) => {
    const { results } = await db.prepare(PRODUCTS_PAGE).bind(afterId, limit).all<{ id: number; stock: number }>();
    check.checked += results.length;
    for (const p of results) if (p.stock < 0) check.violation({ productId: p.id, kind: "NEGATIVE", stock: p.stock });
    const askable = results.slice(0, Math.max(0, limits.maxObjects - asked));
    asked += askable.length;
    if (askable.length < results.length) check.count("objectsNotAsked", results.length - askable.length);
    const rows = askable.map((p) => ({ id: p.id, d1: p.stock }));
    for (const { id, d1, view } of await compareObjects(rows, stockAudit, limits, check)) {
      check.violation({ productId: id, kind: "OBJECT_DISAGREES", stock: d1, objectStock: view.stock, reserved: view.reserved, openEntries: view.openEntries });
    }
    return { size: results.length, lastId: results.at(-1)?.id ?? null };
  });
  await reportNotReached(check, db, "products", stoppedAfter);
  return check.result();
}
