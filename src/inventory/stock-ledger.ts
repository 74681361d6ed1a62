// What the product stock object reads from D1, the record of truth. Each read that decides the fate of
// open entries is one batch, i.e. one snapshot: an order committing meanwhile is in all of it or none.

/** An entry's key says what it waits for: an order placed under that order key, or an order cancelled. */
export const RESTOCK_PREFIX = "cancel:";
export const restockKey = (orderId: number) => `${RESTOCK_PREFIX}${orderId}`;

export interface ProductSnapshot {
  stock: number;
  maxPerUser: number | null;
  /** The latest admin write's id (`adjust`), null before the first. */
  adminWriteId: string | null;
  /** The keys among those asked about whose order (or cancellation) D1 has committed. */
  committed: Set<string>;
}

/** The product's stock and limit, and which of `keys` D1 has committed; null if the product is gone. */
export async function readProductSnapshot(db: D1Database, productId: number, keys: string[]): Promise<ProductSnapshot | null> {
  const { sales, cancellations } = splitKeys(keys);
  const [product, placed, cancelled] = await db.batch<Record<string, unknown>>([
    db.prepare("SELECT stock, max_per_user, admin_write_id FROM products WHERE id = ?").bind(productId),
    db.prepare("SELECT order_key AS k FROM orders WHERE order_key IN (SELECT value FROM json_each(?))").bind(JSON.stringify(sales)),
    db
      .prepare(`SELECT '${RESTOCK_PREFIX}' || id AS k FROM orders WHERE status = 'CANCELLED' AND id IN (SELECT value FROM json_each(?))`)
      .bind(JSON.stringify(cancellations)),
  ]);
  const row = product!.results[0] as { stock: number; max_per_user: number | null; admin_write_id: string | null } | undefined;
  if (!row) return null;
  const committed = new Set([...placed!.results, ...cancelled!.results].map((r) => r.k as string));
  return { stock: row.stock, maxPerUser: row.max_per_user, adminWriteId: row.admin_write_id, committed };
}

/** Whether D1 has committed what the entry `key` waits for. */
export async function isCommitted(db: D1Database, key: string): Promise<boolean> {
  const snapshot = splitKeys([key]);
  const statement = snapshot.sales.length
    ? db.prepare("SELECT 1 AS hit FROM orders WHERE order_key = ?").bind(key)
    : db.prepare("SELECT 1 AS hit FROM orders WHERE id = ? AND status = 'CANCELLED'").bind(snapshot.cancellations[0]!);
  return (await statement.first()) !== null;
}

function splitKeys(keys: string[]) {
  const sales: string[] = [];
  const cancellations: number[] = [];
  for (const key of keys) {
    if (key.startsWith(RESTOCK_PREFIX)) cancellations.push(Number(key.slice(RESTOCK_PREFIX.length)));
    else sales.push(key);
  }
  return { sales, cancellations };
}
