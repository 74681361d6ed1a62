import { DurableObject } from "cloudflare:workers";
import { DAY_MS } from "../lib/clock";
import { describeError, log } from "../lib/log";

// One object per product: the authority on how much of it may still be promised to orders.
//
// It keeps `stock` (what D1 has committed, as far as this object knows) and the open reservations in
// its own SQLite storage, and decides every reservation synchronously from them, with no await between
// the check and the write: concurrent buyers interleave only at whole-method boundaries, so they can
// never both take the last unit. D1's CHECK (stock >= 0) stays the last line of defence.
//
// Invariant: stock - sum(open reservations) <= D1's stock. Everything below keeps the object's view at
// or under D1's, never above it, so a decision made here never promises stock D1 does not have.
//
// On each failure:
// - The Worker that reserved never comes back (isolate died, reply lost, outcome unknown): the reservation
//   expires (RESERVATION_TTL_MS, or SETTLE_SOON_MS when asked) and the alarm settles it against D1:
//   an order committed under its key means sold, anything else means released.
// - A reservation exists only while its alarm is set: if storage refuses setAlarm, the reservation is
//   dropped again and the caller gets the error.
// - The alarm fails (D1 down): it never throws; it sets itself again with backoff (1 s doubling to 1 min),
//   for as long as it takes, rather than relying on the runtime's few retries.
// - A new life (eviction, restart, deploy): stock is reloaded from D1 with the leftovers' fate in the
//   same snapshot, and the alarm is set again for what is still held.
// - One order key reserved twice (an idempotent retry that took over a slow first run which then
//   committed): committed keys are remembered for two days, so a key is subtracted from stock once.
// - D1 refuses an order on CHECK (stock >= 0), so this object was above D1: `resync` reloads it.

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
  maxPerUser: number | null;
  createdAt: string;
  updatedAt: string;
}

/** A reservation not committed or released within this long is settled against D1 by the alarm. */
export const RESERVATION_TTL_MS = 120_000;
/** How soon a reservation whose order's write outcome is unknown is settled against D1. */
const SETTLE_SOON_MS = 5_000;
/** Longer than an idempotency key lives (24 h), so no retry of a committed order outlives the memory of it. */
const SETTLED_KEPT_MS = 2 * DAY_MS;
const ALARM_RETRY_FIRST_MS = 1_000;
const ALARM_RETRY_MAX_MS = 60_000;

export class ProductStock extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private productId: number | null = null;
  private stock = 0;
  private reserved = 0;
  private loading: Promise<boolean> | null = null;
  /** The alarm this life asked storage for; `set` settles once storage has it. Null when none is known. */
  private alarmSet: { at: number; set: Promise<void> } | null = null;
  private alarmFailures = 0;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS reservations (
      order_key TEXT PRIMARY KEY, quantity INTEGER NOT NULL, expires_at INTEGER NOT NULL)`);
    this.sql.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS settled (order_key TEXT PRIMARY KEY, settled_at INTEGER NOT NULL)");
  }

  /** Takes `quantity` for the order `orderKey`, or refuses; idempotent per order key. */
  async reserve(productId: number, orderKey: string, quantity: number): Promise<ReserveResult> {
    if (!(await this.load(productId))) return { ok: false, reason: "PRODUCT_NOT_FOUND", available: 0 };
    // From here to the insert there is no await: this is the critical section.
    // An order already committed under this key needs nothing more: its write will find the order.
    if (this.isSettled(orderKey) || this.holds(orderKey)) return { ok: true, available: this.available() };
    if (quantity > this.available()) return { ok: false, reason: "OUT_OF_STOCK", available: this.available() };
    // The TTL is the object's own timer, not business time: a pinned request clock must not expire it early.
    const expiresAt = Date.now() + RESERVATION_TTL_MS;
    this.sql.exec("INSERT INTO reservations (order_key, quantity, expires_at) VALUES (?, ?, ?)", orderKey, quantity, expiresAt);
    this.reserved += quantity;
    try {
      await this.settleBy(expiresAt);
    } catch (error) {
      // Without an alarm nothing would ever settle it if the caller vanished: do not keep it.
      this.drop(orderKey);
      throw error;
    }
    return { ok: true, available: this.available() };
  }

  /** The order's D1 batch committed: its reservation is now part of D1's stock. */
  async commit(productId: number, orderKey: string): Promise<void> {
    if (!(await this.load(productId))) return;
    this.settle(orderKey, true);
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
    await this.settleBy(at);
  }

  /**
   * D1 and this object disagree (D1 refused an order on its stock CHECK): take D1's stock again, with the
   * fate of the open reservations read in the same snapshot. Calls arriving meanwhile wait for it.
   */
  async resync(productId: number): Promise<void> {
    this.productId = null;
    await this.load(productId);
    log("warn", "stock object re-synced from D1", { productId, stock: this.stock, reserved: this.reserved });
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
         WHERE id = ?5 RETURNING id, name, price, stock, max_per_user AS maxPerUser, created_at AS createdAt, updated_at AS updatedAt`,
      )
        .bind(delta, patch.name ?? null, patch.price ?? null, patch.updatedAt, productId)
        .first<ProductRecord>();
      if (!row) throw new Error(`product ${productId} vanished from D1`);
      if (delta > 0) this.stock += delta;
      return { ok: true, product: row };
    } catch (error) {
      if (delta < 0) this.stock -= delta;
      if (error instanceof Error && error.message.includes("products_stock_non_negative")) {
        await this.resync(productId);
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

  /**
   * Settles reservations whose Worker never came back. It never throws: a failure (D1 down) sets the next
   * try itself, with backoff, so no expired reservation is ever left without an alarm.
   */
  override async alarm(): Promise<void> {
    // The alarm that fired is no longer set; the next one is set below.
    this.alarmSet = null;
    try {
      const known = this.sql.exec<{ value: number }>("SELECT value FROM meta WHERE key = 'product_id'").toArray();
      if (known.length === 0 || !(await this.load(known[0]!.value))) return;
      await this.settleExpired();
      this.alarmFailures = 0;
    } catch (error) {
      this.alarmFailures += 1;
      const delayMs = Math.min(ALARM_RETRY_MAX_MS, ALARM_RETRY_FIRST_MS * 2 ** (this.alarmFailures - 1));
      log("warn", "stock settlement failed; trying again", {
        productId: this.productId,
        failures: this.alarmFailures,
        delayMs,
        ...describeError(error),
      });
      // If even this fails, the alarm throws and the runtime's own retry is the last resort.
      await this.armAlarm(Date.now() + delayMs);
      return;
    }
    const next = this.earliestExpiry();
    if (next !== null) await this.armAlarm(next);
  }

  private async settleExpired(): Promise<void> {
    const expired = this.sql
      .exec<{ order_key: string }>("SELECT order_key FROM reservations WHERE expires_at <= ?", Date.now())
      .toArray();
    for (const { order_key } of expired) {
      const committed = await this.orderCommitted(order_key);
      this.settle(order_key, committed);
      log("warn", "stale stock reservation settled", { productId: this.productId, orderKey: order_key, committed });
    }
    this.sql.exec("DELETE FROM settled WHERE settled_at < ?", Date.now() - SETTLED_KEPT_MS);
  }

  private available(): number {
    return this.stock - this.reserved;
  }

  private holds(orderKey: string): boolean {
    return this.sql.exec("SELECT 1 FROM reservations WHERE order_key = ?", orderKey).toArray().length > 0;
  }

  private isSettled(orderKey: string): boolean {
    return this.sql.exec("SELECT 1 FROM settled WHERE order_key = ?", orderKey).toArray().length > 0;
  }

  /**
   * Ends a reservation: committed, its units leave `stock` (D1 took them), once per order key however
   * many reservations that key had; otherwise they are simply free again.
   */
  private settle(orderKey: string, committed: boolean): void {
    const quantity = this.drop(orderKey);
    if (quantity === null || !committed) return;
    if (!this.isSettled(orderKey)) this.stock -= quantity;
    this.markSettled(orderKey);
  }

  private markSettled(orderKey: string): void {
    this.sql.exec("INSERT OR IGNORE INTO settled (order_key, settled_at) VALUES (?, ?)", orderKey, Date.now());
  }

  private drop(orderKey: string): number | null {
    const rows = this.sql
      .exec<{ quantity: number }>("DELETE FROM reservations WHERE order_key = ? RETURNING quantity", orderKey)
      .toArray();
    if (rows.length === 0) return null;
    this.reserved -= rows[0]!.quantity;
    return rows[0]!.quantity;
  }

  private earliestExpiry(): number | null {
    return this.sql.exec<{ at: number | null }>("SELECT min(expires_at) AS at FROM reservations").one().at;
  }

  /** Makes sure the alarm fires by `at`; resolves once storage holds it. */
  private settleBy(at: number): Promise<void> {
    if (this.alarmSet !== null && this.alarmSet.at <= at) return this.alarmSet.set;
    // None known (a new life, or the alarm is running) or later than needed: the earliest reservation decides.
    return this.armAlarm(Math.min(this.earliestExpiry() ?? at, at));
  }

  /** Sets the alarm at `at`, trusted only once storage accepted it. */
  private armAlarm(at: number): Promise<void> {
    const entry = { at, set: this.ctx.storage.setAlarm(at) };
    this.alarmSet = entry;
    entry.set.catch((error: unknown) => {
      if (this.alarmSet === entry) this.alarmSet = null;
      log("error", "stock settlement alarm could not be set", { productId: this.productId, at, ...describeError(error) });
    });
    return entry.set;
  }

  /**
   * Loads the product's stock from D1 once per object lifetime (so also after a restart, or when asked to
   * resync). Reservations left in storage by a previous lifetime are settled first: those whose order
   * reached D1 are already in D1's stock, the rest stay held until they are committed, released or expire,
   * and the alarm is set for them.
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
    for (const { order_key } of committedRows!.results) {
      this.drop(order_key!);
      this.markSettled(order_key!);
    }
    this.stock = stock;
    this.reserved = this.sql.exec<{ total: number }>("SELECT coalesce(sum(quantity), 0) AS total FROM reservations").one().total;
    this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('product_id', ?)", productId);
    const earliest = this.earliestExpiry();
    if (earliest !== null && this.alarmSet === null) await this.armAlarm(earliest);
    this.productId = productId;
    return true;
  }

  private async orderCommitted(orderKey: string): Promise<boolean> {
    const row = await this.env.DB.prepare("SELECT 1 AS hit FROM orders WHERE order_key = ?").bind(orderKey).first();
    return row !== null;
  }
}
