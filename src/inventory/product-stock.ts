import { DurableObject } from "cloudflare:workers";
import { log } from "../lib/log";

// One object per product: the authority on how much of it may still be promised to orders.
//
// It keeps `stock` (what D1 has committed, as far as this object knows) and the open reservations in
// its own SQLite storage, and decides every reservation synchronously from them, with no await between
// the check and the write: concurrent buyers interleave only at whole-method boundaries, so they can
// never both take the last unit. D1's CHECK (stock >= 0) stays the last line of defence.
//
// Invariant: stock - sum(open reservations) <= D1's stock. Everything below keeps the object's view at
// or under D1's, never above it, so a decision made here never promises stock D1 does not have.

export type ReserveResult =
  | { ok: true; available: number }
  | { ok: false; reason: "OUT_OF_STOCK" | "PRODUCT_NOT_FOUND"; available: number };

export interface StockPatch {
  name?: string;
  price?: number;
  stockDelta: number;
  updatedAt: string;
}

export type AdjustResult =
  | { ok: true; product: ProductRecord }
  | { ok: false; reason: "OUT_OF_STOCK" | "PRODUCT_NOT_FOUND" };

/** The product row as drizzle names it, so the catalog's own mapper shapes it. */
export interface ProductRecord {
  id: number;
  name: string;
  price: number;
  stock: number;
  createdAt: string;
  updatedAt: string;
}

/** A reservation not committed or released within this long is settled against D1 by the alarm. */
export const RESERVATION_TTL_MS = 120_000;
/** How soon a reservation whose order's write outcome is unknown is settled against D1. */
const SETTLE_SOON_MS = 5_000;

export class ProductStock extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private productId: number | null = null;
  private stock = 0;
  private reserved = 0;
  private loading: Promise<boolean> | null = null;
  /** When the alarm this life set will fire; null before it set one (or after it fired). */
  private alarmAt: number | null = null;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS reservations (
      order_key TEXT PRIMARY KEY, quantity INTEGER NOT NULL, expires_at INTEGER NOT NULL)`);
    this.sql.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)");
  }

  /** Takes `quantity` for the order `orderKey`, or refuses; idempotent per order key. */
  async reserve(productId: number, orderKey: string, quantity: number): Promise<ReserveResult> {
    if (!(await this.load(productId))) return { ok: false, reason: "PRODUCT_NOT_FOUND", available: 0 };
    // From here to the return there is no await: this is the critical section.
    const held = this.sql.exec<{ quantity: number }>("SELECT quantity FROM reservations WHERE order_key = ?", orderKey).toArray();
    if (held.length > 0) return { ok: true, available: this.available() };
    if (quantity > this.available()) return { ok: false, reason: "OUT_OF_STOCK", available: this.available() };
    // The TTL is the object's own timer, not business time: a pinned request clock must not expire it early.
    const expiresAt = Date.now() + RESERVATION_TTL_MS;
    this.sql.exec("INSERT INTO reservations (order_key, quantity, expires_at) VALUES (?, ?, ?)", orderKey, quantity, expiresAt);
    this.reserved += quantity;
    this.scheduleSettlement(expiresAt);
    return { ok: true, available: this.available() };
  }

  /** The order's D1 batch committed: its reservation is now part of D1's stock. */
  async commit(productId: number, orderKey: string): Promise<void> {
    if (!(await this.load(productId))) return;
    const quantity = this.drop(orderKey);
    if (quantity !== null) this.stock -= quantity;
  }

  /** The order failed: give its reservation back. */
  async release(productId: number, orderKey: string): Promise<void> {
    if (!(await this.load(productId))) return;
    this.drop(orderKey);
  }

  /**
   * The order's write failed in a way that may have committed: settle its reservation against D1 soon
   * (committed means sold, else released) rather than hold the stock for the whole TTL.
   */
  async settleSoon(productId: number, orderKey: string): Promise<void> {
    if (!(await this.load(productId))) return;
    const at = Date.now() + SETTLE_SOON_MS;
    this.sql.exec("UPDATE reservations SET expires_at = min(expires_at, ?) WHERE order_key = ?", at, orderKey);
    this.scheduleSettlement(at);
  }

  /**
   * An admin stock change (with an optional rename or reprice), written to D1 by this object so the
   * object and D1 never disagree. A decrease is taken here first (it cannot dip into reserved stock),
   * an increase only after D1 has it: either way the object never offers stock D1 lacks.
   */
  async adjust(productId: number, patch: StockPatch): Promise<AdjustResult> {
    if (!(await this.load(productId))) return { ok: false, reason: "PRODUCT_NOT_FOUND" };
    const delta = patch.stockDelta;
    if (delta < 0) {
      if (this.available() + delta < 0) return { ok: false, reason: "OUT_OF_STOCK" };
      this.stock += delta;
    }
    try {
      const row = await this.env.DB.prepare(
        `UPDATE products SET stock = stock + ?1, name = coalesce(?2, name), price = coalesce(?3, price), updated_at = ?4
         WHERE id = ?5 RETURNING id, name, price, stock, created_at AS createdAt, updated_at AS updatedAt`,
      )
        .bind(delta, patch.name ?? null, patch.price ?? null, patch.updatedAt, productId)
        .first<ProductRecord>();
      if (!row) throw new Error(`product ${productId} vanished from D1`);
      if (delta > 0) this.stock += delta;
      return { ok: true, product: row };
    } catch (error) {
      if (delta < 0) this.stock -= delta;
      if (error instanceof Error && error.message.includes("products_stock_non_negative")) {
        return { ok: false, reason: "OUT_OF_STOCK" };
      }
      throw error;
    }
  }

  /** What the object believes: for tests and operations. */
  async snapshot(productId: number): Promise<{ stock: number; reserved: number; available: number } | null> {
    if (!(await this.load(productId))) return null;
    return { stock: this.stock, reserved: this.reserved, available: this.available() };
  }

  /** Settles reservations whose Worker never came back: committed in D1 means sold, otherwise released. */
  override async alarm(): Promise<void> {
    // A running alarm is no longer set; the next one is set below if reservations remain.
    this.alarmAt = null;
    const known = this.sql.exec<{ value: number }>("SELECT value FROM meta WHERE key = 'product_id'").toArray();
    if (known.length === 0 || !(await this.load(known[0]!.value))) return;
    const now = Date.now();
    const expired = this.sql
      .exec<{ order_key: string }>("SELECT order_key FROM reservations WHERE expires_at <= ?", now)
      .toArray();
    for (const { order_key } of expired) {
      const committed = await this.orderCommitted(order_key);
      const quantity = this.drop(order_key);
      if (quantity !== null && committed) this.stock -= quantity;
      log("warn", "stale stock reservation settled", { productId: this.productId, orderKey: order_key, committed });
    }
    const next = this.sql.exec<{ at: number | null }>("SELECT min(expires_at) AS at FROM reservations").one().at;
    if (next !== null) {
      this.alarmAt = next;
      await this.ctx.storage.setAlarm(next);
    }
  }

  private available(): number {
    return this.stock - this.reserved;
  }

  private drop(orderKey: string): number | null {
    const rows = this.sql
      .exec<{ quantity: number }>("DELETE FROM reservations WHERE order_key = ? RETURNING quantity", orderKey)
      .toArray();
    if (rows.length === 0) return null;
    this.reserved -= rows[0]!.quantity;
    return rows[0]!.quantity;
  }

  /** Makes sure the alarm fires by `at`; the reservations table, not a storage read, says what is due. */
  private scheduleSettlement(at: number): void {
    if (this.alarmAt != null && this.alarmAt <= at) return;
    // Unknown (a new life), none set, or later than needed: the earliest reservation decides.
    const earliest = this.sql.exec<{ at: number | null }>("SELECT min(expires_at) AS at FROM reservations").one().at;
    this.alarmAt = Math.min(earliest ?? at, at);
    void this.ctx.storage.setAlarm(this.alarmAt);
  }



  /**
   * Loads the product's stock from D1 once per object lifetime (so also after a restart). Reservations
   * left in storage by a previous lifetime are settled first: those whose order reached D1 are already
   * in D1's stock, the rest stay held until they are committed, released or expire.
   */
  private load(productId: number): Promise<boolean> {
    if (this.productId === productId) return Promise.resolve(true);
    this.loading ??= this.loadFromD1(productId).finally(() => {
      this.loading = null;
    });
    return this.loading;
  }

  private async loadFromD1(productId: number): Promise<boolean> {
    const leftovers = this.sql.exec<{ order_key: string }>("SELECT order_key FROM reservations").toArray();
    // One batch is one D1 transaction: the stock and the leftovers' fate are read from the same snapshot,
    // so an order committing meanwhile is either in both or in neither.
    const [stockRows, committedRows] = await this.env.DB.batch<{ stock?: number; order_key?: string }>([
      this.env.DB.prepare("SELECT stock FROM products WHERE id = ?").bind(productId),
      this.env.DB.prepare("SELECT order_key FROM orders WHERE order_key IN (SELECT value FROM json_each(?))").bind(
        JSON.stringify(leftovers.map((r) => r.order_key)),
      ),
    ]);
    const stock = stockRows!.results[0]?.stock;
    if (stock === undefined) return false;
    for (const { order_key } of committedRows!.results) this.drop(order_key!);
    this.stock = stock;
    this.reserved = this.sql.exec<{ total: number }>("SELECT coalesce(sum(quantity), 0) AS total FROM reservations").one().total;
    this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('product_id', ?)", productId);
    this.productId = productId;
    return true;
  }

  private async orderCommitted(orderKey: string): Promise<boolean> {
    const row = await this.env.DB.prepare("SELECT 1 AS hit FROM orders WHERE order_key = ?").bind(orderKey).first();
    return row !== null;
  }
}
