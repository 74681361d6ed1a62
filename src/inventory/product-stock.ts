import { DurableObject } from "cloudflare:workers";
import type { products } from "../db/schema";
import { DAY_MS } from "../lib/clock";
import { describeError, log } from "../lib/log";
import { withRequestId } from "../lib/request-context";
import { dispatchOutbox, queuesOf } from "../orders/outbox";
import { OrderGroup, type GroupOutcome, type SingleProductOrder } from "./order-group";
import { isCommitted, readProductSnapshot } from "./stock-ledger";

// One object per product: the authority on how much of it may still be promised to orders, and to whom.
//
// It keeps `stock` (what D1 has committed, as far as this object knows), the open entries (reservations
// for orders being placed, restocks for orders being cancelled) and each user's purchased units in its
// own SQLite storage, and decides every reservation synchronously from them, with no await between the
// check and the write: concurrent buyers interleave only at whole-method boundaries, so they can never
// both take the last unit, nor one user pass the product's limit. D1's CHECKs (stock >= 0, a user's
// units within max_per_user) stay the last line of defence.
//
// Invariant: stock - sum(open reservations) <= D1's stock. Everything below keeps the object's view at
// or under D1's, never above it, so a decision made here never promises stock D1 does not have: a
// reservation is taken before D1 writes the order; a restock is added only after D1 wrote the
// cancellation (until then it is announced, not available).
//
// On each failure:
// - The Worker that reserved never comes back (isolate died, reply lost, outcome unknown): the reservation
//   expires (RESERVATION_TTL_MS, or SETTLE_SOON_MS when asked) and the alarm settles it against D1:
//   an order committed under its key means sold (a cancellation committed means restocked), anything else
//   means released.
// - A reservation exists only while its alarm is set: if storage refuses setAlarm, the reservation is
//   dropped again and the caller gets the error.
// - The alarm fails (D1 down): it never throws; it sets itself again with backoff (1 s doubling to 1 min),
//   for as long as it takes, rather than relying on the runtime's few retries.
// - A new life (eviction, restart, deploy): stock is reloaded from D1 with the leftovers' fate in the
//   same snapshot, and the alarm is set again for what is still held.
// - One order key reserved twice (an idempotent retry that took over a slow first run which then
//   committed): committed keys are remembered for two days, so a key is subtracted from stock once.
// - D1 refuses an order on CHECK (stock >= 0), so this object was above D1: `resync` reloads it.
// - An admin change fails or its reply is lost: `resync` too, never an undo of what D1 may have. A load
//   counts every admin decrease in flight during its read as made, and keeps the tighter of each limit in
//   flight and the one it read (errs on the safe side until the adjust re-reads).
// - A re-read fails (D1 down): this life keeps settling what it holds, and decides nothing before it has
//   read D1 again (`loadToDecide`, `loadToSettle`).
// - The object's life ends while its admin write is in flight, or the write's reply is lost while D1 may
//   still be running it: storage keeps a record of every admin write (`admin_writes`, made before the write
//   leaves) until its outcome is known, and the write leaves its id in D1 (`products.admin_write_id`). A load
//   that finds a record whose id D1 does not show counts its decrease as taken and keeps its limit if tighter
//   until it could no longer land (ADMIN_WRITE_SETTLED_MS); then the alarm, or the next decision, reads D1
//   again (an increase shows from then on).
// - The reservation cannot be made at all (a load or the alarm fails): a plain 503 (`couldNotReserve`).

export type StockRefusal = "PRODUCT_NOT_FOUND" | "OUT_OF_STOCK" | "PURCHASE_LIMIT_EXCEEDED";

export type ReserveResult =
  | { ok: true; available: number }
  | { ok: false; reason: StockRefusal; available: number; held: number; maxPerUser: number | null };

export interface StockPatch {
  name?: string;
  price?: number;
  stockDelta: number;
  /** undefined: unchanged; null: no limit. */
  maxPerUser?: number | null;
  updatedAt: string;
}

type Entry = {
  quantity: number;
  user_id: number | null;
  kind: "SALE" | "RESTOCK";
};

export type AdjustResult =
  | { ok: true; product: ProductRecord }
  | { ok: false; reason: "OUT_OF_STOCK" | "PRODUCT_NOT_FOUND" };

/** The product row as drizzle names it, so the catalog's own mapper shapes it. */
export type ProductRecord = Omit<typeof products.$inferSelect, "adminWriteId">;

/** A reservation not committed or released within this long is settled against D1 by the alarm. */
export const RESERVATION_TTL_MS = 120_000;
/** How soon a reservation whose order's write outcome is unknown is settled against D1. */
const SETTLE_SOON_MS = 5_000;
/** Longer than an idempotency key lives (24 h), so no retry of a committed order outlives the memory of it. */
const SETTLED_KEPT_MS = 2 * DAY_MS;
/**
 * How long an admin write whose object's life ended may still land in D1: the reservation TTL, which the
 * alarm already takes as the time after which a dead run's write has landed or never will.
 */
export const ADMIN_WRITE_SETTLED_MS = RESERVATION_TTL_MS;
const ALARM_RETRY_FIRST_MS = 1_000;
const ALARM_RETRY_MAX_MS = 60_000;

/** The tighter of two purchase limits; null is no limit. */
const tighterOf = (a: number | null, b: number | null): number | null => (a === null ? b : b === null ? a : Math.min(a, b));

/**
 * An order whose units could not be asked for (D1 unreadable on a load, the alarm refused by storage): nothing
 * was taken (a failed load takes nothing, a hold without its alarm is dropped) and nothing written, so it is a
 * plain 503, not an unknown outcome: the Worker releases its claim, and a retry runs at once.
 */
function couldNotReserve(productId: number, order: SingleProductOrder, error: unknown): { stock: ReserveResult; outcome: GroupOutcome } {
  withRequestId(order.requestId, () => log("error", "stock object could not reserve", { productId, ...describeError(error) }));
  return {
    stock: { ok: true, available: 0 },
    outcome: { ok: false, code: "SERVICE_UNAVAILABLE", detail: "The order could not be placed right now; retry shortly" },
  };
}

export class ProductStock extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  private productId: number | null = null;
  private stock = 0;
  private reserved = 0;
  private maxPerUser: number | null = null;
  private loading: Promise<boolean> | null = null;
  /** The alarm this life asked storage for; `set` settles once storage has it. Null when none is known. */
  private alarmSet: { at: number; set: Promise<void> } | null = null;
  private alarmFailures = 0;
  /** How many times this life took D1's numbers (first load and re-syncs). */
  private loads = 0;
  /** A re-read of D1 failed (`resync`): D1 is read again before the next decision. */
  private decideAfterReload = false;
  /** The product this life has loaded at least once: what it holds can be settled without reading D1 again. */
  private loadedOnce: number | null = null;
  /** Units admin decreases took here whose D1 writes are still in flight, and all they ever took (see `adjust`). */
  private decreasesInFlight = 0;
  private decreasesStarted = 0;
  /** Purchase limits of this life's admin writes in flight, and the tightest a load must keep (with D1's). */
  private limitsInFlight: number[] = [];
  private limitForLoad: number | null = null;
  /** This life's admin writes in flight (rows of `admin_writes`): the other rows are earlier ones (`loadFromD1`). */
  private readonly ownAdminWrites = new Set<string>();
  /** When an earlier life's admin writes can no longer land: D1 is read again before the first decision after. */
  private earlierWritesSettleAt: number | null = null;
  private orders: OrderGroup | null = null;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS reservations (
      order_key TEXT PRIMARY KEY, quantity INTEGER NOT NULL, expires_at INTEGER NOT NULL)`);
    const columns = this.sql.exec<{ name: string }>("PRAGMA table_info(reservations)").toArray().map((c) => c.name);
    // Objects from before purchase limits and cancellations: their entries are sales of an unknown buyer.
    if (!columns.includes("user_id")) this.sql.exec("ALTER TABLE reservations ADD COLUMN user_id INTEGER");
    if (!columns.includes("kind")) this.sql.exec("ALTER TABLE reservations ADD COLUMN kind TEXT NOT NULL DEFAULT 'SALE'");
    this.sql.exec("CREATE INDEX IF NOT EXISTS reservations_user ON reservations (user_id)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS settled (order_key TEXT PRIMARY KEY, settled_at INTEGER NOT NULL)");
    // Units each user holds in committed, non-cancelled orders (counted from when this table exists, like
    // D1's user_product_purchases): changed only when an entry settles, so exactly once per order key.
    this.sql.exec("CREATE TABLE IF NOT EXISTS purchases (user_id INTEGER PRIMARY KEY, quantity INTEGER NOT NULL)");
    // Admin writes in flight: what each took here (a decrease), the limit it sets, and when it started.
    this.sql.exec(`CREATE TABLE IF NOT EXISTS admin_writes (
      write_id TEXT PRIMARY KEY, decrease INTEGER NOT NULL, max_per_user INTEGER, started_at INTEGER NOT NULL)`);
  }

  /**
   * Takes `quantity` for `userId`'s order `orderKey`, or refuses (out of stock first, then the user's
   * limit); idempotent per order key.
   */
  async reserve(productId: number, orderKey: string, quantity: number, userId: number, requestId?: string): Promise<ReserveResult> {
    return withRequestId(requestId, () => this.take(productId, orderKey, quantity, userId));
  }

  /** `newKey`: the caller knows no entry can exist under `orderKey` yet (a key made for this request alone). */
  private async take(productId: number, orderKey: string, quantity: number, userId: number, newKey = false): Promise<ReserveResult> {
    if (!(await this.loadToDecide(productId))) return this.refusal("PRODUCT_NOT_FOUND", userId);
    // From here to the insert there is no await: this is the critical section.
    // An order already committed under this key needs nothing more: its write will find the order. An entry
    // still open under it (an earlier run of the same keyed order) is this run's too (see `adopt`).
    if (!newKey && this.known(orderKey)) {
      this.adopt(orderKey);
      return { ok: true, available: this.available() };
    }
    const refusal = this.assess(quantity, userId);
    if (refusal) return this.refusal(refusal, userId);
    await this.hold(orderKey, { quantity, user_id: userId, kind: "SALE" });
    return { ok: true, available: this.available() };
  }

  /**
   * An order of this product alone, from reservation to commit: reserved here at once (or refused), then
   * written to D1 with the other orders admitted meanwhile in one group commit (see order-group.ts). The
   * caller hears back once its rows are committed; whatever happens to the caller, this object finishes
   * the order and settles its units.
   */
  async placeOrder(productId: number, order: SingleProductOrder): Promise<{ stock: ReserveResult; outcome?: GroupOutcome }> {
    if (order.claimToMake) throw new Error("an order whose key is to be claimed goes to placeOrderClaiming");
    // An unkeyed order's key is a fresh UUID, and a claim that began its key's life now has a fresh effect:
    // neither can have an entry here yet, so the lookup of one is skipped (a takeover's key is looked up).
    const newKey = order.claim === null || order.claim.fresh === true;
    let stock: ReserveResult;
    try {
      stock = await withRequestId(order.requestId, () => this.take(productId, order.orderKey, order.quantity, order.userId, newKey));
    } catch (error) {
      return couldNotReserve(productId, order, error);
    }
    if (!stock.ok) return { stock };
    return { stock, outcome: await this.orderGroup(productId).submit(order) };
  }

  /**
   * An order of this product alone under an Idempotency-Key the Worker has not claimed: the group claims
   * it with the other new keys of the group, then reserves its units (see order-group.ts). A method of its
   * own, so that an object still running older code refuses it instead of ignoring the key.
   */
  async placeOrderClaiming(productId: number, order: SingleProductOrder): Promise<{ stock: ReserveResult; outcome?: GroupOutcome }> {
    // What is refused now is refused at once, without a claim (the Worker stores the refusal under the key if
    // the key has no row): units are only ever held by orders whose claims are committed, so a refusal
    // caused by a run of the same key finds that run's claim and goes the usual way (409, or a takeover once
    // that run failed: a failed run's claim is released, never deleted, so the refusal is not stored).
    let now: ReserveResult;
    try {
      now = await withRequestId(order.requestId, () => this.check(productId, order.quantity, order.userId));
    } catch (error) {
      return couldNotReserve(productId, order, error);
    }
    if (!now.ok) return { stock: now };
    const outcome = await this.orderGroup(productId).submit(order);
    return { stock: (!outcome.ok && outcome.stock) || { ok: true, available: this.available() }, outcome };
  }

  /** D1 write batches of order groups and the orders in them, since this life began: for operations. */
  async groupCounters(): Promise<{ writeBatches: number; ordersWritten: number }> {
    return this.orders?.counters ?? { writeBatches: 0, ordersWritten: 0 };
  }

  /** What `reserve` would answer, without taking anything: to name the first of several refusals. */
  async check(productId: number, quantity: number, userId: number): Promise<ReserveResult> {
    if (!(await this.loadToDecide(productId))) return this.refusal("PRODUCT_NOT_FOUND", userId);
    const refusal = this.assess(quantity, userId);
    return refusal ? this.refusal(refusal, userId) : { ok: true, available: this.available() };
  }

  /**
   * The order `orderId` of `userId` is being cancelled: its `quantity` comes back once D1 has the
   * cancellation (`commit` with the same key, or the alarm finding it in D1), never before.
   */
  async announceRestock(productId: number, restockKey: string, quantity: number, userId: number): Promise<void> {
    if (!(await this.load(productId))) return;
    if (this.known(restockKey)) return this.adopt(restockKey);
    await this.hold(restockKey, { quantity, user_id: userId, kind: "RESTOCK" });
  }

  /** The order's (or the cancellation's) D1 batch committed: the entry is now part of D1's stock. */
  async commit(productId: number, orderKey: string): Promise<void> {
    if (!(await this.loadToSettle(productId))) return;
    this.settle(orderKey, true);
  }

  /** The order failed: give its reservation back (or forget the restock of a cancellation that failed). */
  async release(productId: number, orderKey: string): Promise<void> {
    if (!(await this.loadToSettle(productId))) return;
    this.drop(orderKey);
  }

  /**
   * The order's write failed in a way that may have committed: settle its reservation against D1 soon
   * (committed means sold, else released) rather than hold the stock for the whole TTL.
   */
  async settleSoon(productId: number, orderKey: string): Promise<void> {
    if (!(await this.loadToSettle(productId))) return;
    const at = Date.now() + SETTLE_SOON_MS;
    this.sql.exec("UPDATE reservations SET expires_at = min(expires_at, ?) WHERE order_key = ?", at, orderKey);
    await this.settleBy(at);
  }

  /**
   * D1 and this object disagree (D1 refused an order on its stock CHECK): take D1's stock again, with the
   * fate of the open reservations read in the same snapshot. Calls arriving meanwhile wait for it.
   */
  async resync(productId: number, requestId?: string): Promise<void> {
    // A load already running may have read D1 before what made this one due: let it end, then read again.
    if (this.loading) await this.loading.catch(() => undefined);
    const loaded = this.productId;
    this.productId = null;
    try {
      await this.load(productId);
    } catch (error) {
      // D1 unreadable: this life keeps what it knows, so releases, commits and alarms still apply, but it
      // decides nothing more (a reservation, an admin change) before D1 has been read again (`loadToDecide`).
      if (this.productId === null && loaded === productId) {
        this.productId = loaded;
        this.decideAfterReload = true;
      }
      throw error;
    }
    this.decideAfterReload = false;
    const state = { productId, stock: this.stock, reserved: this.reserved };
    withRequestId(requestId, () => log("warn", "stock object re-synced from D1", state));
  }

  /**
   * An admin stock change (with an optional rename or reprice), written to D1 by this object so the
   * object and D1 never disagree. A decrease is taken here first (it cannot dip into reserved stock),
   * an increase only after D1 has it: either way the object never offers stock D1 lacks.
   */
  async adjust(productId: number, patch: StockPatch): Promise<AdjustResult> {
    if (!(await this.loadToDecide(productId))) return { ok: false, reason: "PRODUCT_NOT_FOUND" };
    const delta = patch.stockDelta;
    if (delta < 0 && this.available() + delta < 0) return { ok: false, reason: "OUT_OF_STOCK" };
    // A tighter limit applies before D1 has it (it can only refuse more); a looser one only after, so no
    // order admitted under it can meet D1's CHECK with the old limit copied into its purchase row.
    const limit = patch.maxPerUser;
    const previousLimit = this.maxPerUser;
    const tighter = limit !== undefined && limit !== null && (previousLimit === null || limit < previousLimit);
    // Any limit written may be D1's from the moment it lands: a load keeps the tighter of it and what it read
    // (whatever this object holds now, which may be a kept limit tighter than D1's).
    const limitWritten = limit === undefined ? null : limit;
    const decrease = Math.max(0, -delta);
    // Recorded before anything is taken here and before the write leaves (the output gate holds the write
    // until storage has the row): a next life, or this one if the outcome is lost, knows it may land later.
    const writeId = delta !== 0 || limit !== undefined ? this.recordAdminWrite(decrease, limitWritten) : null;
    if (tighter) this.maxPerUser = limit;
    if (limitWritten !== null) {
      this.limitsInFlight.push(limitWritten);
      if (this.loading) this.limitForLoad = tighterOf(this.limitForLoad, limitWritten);
    }
    // A decrease is taken before the write; a load reading D1 meanwhile counts it taken too (loadFromD1).
    this.stock -= decrease;
    this.decreasesInFlight += decrease;
    this.decreasesStarted += decrease;
    // The write returned. Its outcome known, its record goes; unknown (a reply lost: D1 may still be running
    // it), the record stays and loads count it as an earlier life's write until D1 shows it or it cannot land.
    const returned = (outcomeKnown: boolean) => {
      this.decreasesInFlight -= decrease;
      if (limitWritten !== null) this.limitsInFlight.splice(this.limitsInFlight.indexOf(limitWritten), 1);
      if (writeId === null) return;
      if (outcomeKnown) this.forgetAdminWrite(writeId);
      else this.ownAdminWrites.delete(writeId);
    };
    // A load during the write replaces `stock` with a snapshot that may or may not hold this change: then the
    // arithmetic below would count it twice or not at all, so D1 is read again instead.
    const loads = this.loads;
    const reloaded = () => this.loads !== loads || this.loading !== null;
    let row: ProductRecord | null;
    try {
      row = await this.env.DB.prepare(
        `UPDATE products SET stock = stock + ?1, name = coalesce(?2, name), price = coalesce(?3, price), updated_at = ?4,
           max_per_user = CASE WHEN ?6 THEN ?7 ELSE max_per_user END, admin_write_id = coalesce(?8, admin_write_id)
         WHERE id = ?5 RETURNING id, name, price, stock, max_per_user AS maxPerUser, created_at AS createdAt, updated_at AS updatedAt`,
      )
        .bind(delta, patch.name ?? null, patch.price ?? null, patch.updatedAt, productId, limit !== undefined ? 1 : 0, limit ?? null, writeId)
        .first<ProductRecord>();
    } catch (error) {
      // Refused by D1's stock CHECK: nothing was written, so the change is undone here. Any other failure may
      // have committed (a reply lost): the object stays on the safe side (the decrease taken, a tighter limit
      // kept). Either way it then takes D1's numbers (undoing a lost +5 would keep it unsellable, a lost -5 on
      // offer); if even that read fails, it decides nothing before it has them.
      const refused = error instanceof Error && error.message.includes("products_stock_non_negative");
      returned(refused);
      if (refused && !reloaded()) {
        this.stock += decrease;
        // Not this write's limit; the tighter of what it replaced and the limits of the others in flight.
        this.maxPerUser = this.limitsInFlight.reduce(tighterOf, previousLimit);
      }
      await this.tryResync(productId);
      if (refused) return { ok: false, reason: "OUT_OF_STOCK" };
      throw error;
    }
    returned(true);
    if (!row) {
      await this.tryResync(productId);
      throw new Error(`product ${productId} vanished from D1`);
    }
    // Earlier writes still unsettled keep their limits and decreases: only a load counts them again.
    if (reloaded() || this.earlierWritesSettleAt !== null) await this.tryResync(productId);
    else {
      if (delta > 0) this.stock += delta;
      if (limit !== undefined) this.maxPerUser = limit;
    }
    // Committed: it is answered as applied even if the re-read failed (the object then reads D1 before deciding).
    return { ok: true, product: row };
  }

  /** Its id, which the write also leaves in D1 (`products.admin_write_id`). */
  private recordAdminWrite(decrease: number, maxPerUser: number | null): string {
    const writeId = crypto.randomUUID();
    this.sql.exec(
      "INSERT INTO admin_writes (write_id, decrease, max_per_user, started_at) VALUES (?, ?, ?, ?)",
      writeId,
      decrease,
      maxPerUser,
      Date.now(),
    );
    this.ownAdminWrites.add(writeId);
    return writeId;
  }

  private forgetAdminWrite(writeId: string): void {
    this.sql.exec("DELETE FROM admin_writes WHERE write_id = ?", writeId);
    this.ownAdminWrites.delete(writeId);
  }

  /** `resync`, its failure logged: the object then decides nothing before it has read D1 (see `resync`). */
  private async tryResync(productId: number): Promise<void> {
    await this.resync(productId).catch((error: unknown) =>
      log("warn", "stock object could not re-read D1; it will before its next decision", { productId, ...describeError(error) }),
    );
  }

  /** What the object believes: for tests and operations. */
  async snapshot(productId: number): Promise<{ stock: number; reserved: number; available: number } | null> {
    if (!(await this.load(productId))) return null;
    return { stock: this.stock, reserved: this.reserved, available: this.available() };
  }

  /** Units `userId` holds: purchased (not cancelled) plus reserved. For tests and operations. */
  async heldBy(productId: number, userId: number): Promise<number | null> {
    if (!(await this.load(productId))) return null;
    return this.held(userId);
  }

  /**
   * For the audit, read-only: the stock this object holds and its open entries (sales and announced
   * restocks), or null when it has not loaded `productId` in this life (it reads D1's stock before its first
   * decision, so there is nothing to disagree with). With no open entry, `stock` must equal D1's.
   */
  async auditView(productId: number): Promise<{ stock: number; reserved: number; openEntries: number } | null> {
    if (this.productId !== productId) return null;
    // An admin write in flight (this life's or an earlier one's) is open too: D1 may not have it yet.
    const openEntries = this.sql
      .exec<{ n: number }>("SELECT (SELECT count(*) FROM reservations) + (SELECT count(*) FROM admin_writes) AS n")
      .one().n;
    return { stock: this.stock, reserved: this.reserved, openEntries };
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
      // Earlier admin writes have landed or never will: D1's numbers again, without them.
      if (this.earlierWritesSettleAt !== null && Date.now() >= this.earlierWritesSettleAt) await this.resync(known[0]!.value);
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

  private orderGroup(productId: number): OrderGroup {
    this.orders ??= new OrderGroup(this.env.DB, productId, {
      // A claim made by the group just now began its key's life: no entry can exist under its order key.
      reserve: (order) => withRequestId(order.requestId, () => this.take(productId, order.orderKey, order.quantity, order.userId, true)),
      committed: (key) => this.settle(key, true),
      released: (key) => void this.drop(key),
      unknown: (key) =>
        void this.settleSoon(productId, key).catch((error: unknown) =>
          log("error", "stock object could not settle an unknown outcome soon; its TTL will", { productId, orderKey: key, ...describeError(error) }),
        ),
      resync: () => void this.tryResync(productId),
      dispatch: (outbox, now) => this.ctx.waitUntil(dispatchOutbox(this.env.DB, queuesOf(this.env), outbox, now)),
    });
    return this.orders;
  }

  private async settleExpired(): Promise<void> {
    const now = Date.now();
    const expired = this.sql.exec<{ order_key: string }>("SELECT order_key FROM reservations WHERE expires_at <= ?", now).toArray();
    for (const { order_key } of expired) {
      const committed = await isCommitted(this.env.DB, order_key);
      // A re-read in flight would defer the settle past the check below: let it end first.
      while (this.loading) await this.loading.catch(() => undefined);
      // Adopted while D1 was asked (a later run of the same order pushed its expiry back): that run ends it.
      if (this.sql.exec("SELECT 1 FROM reservations WHERE order_key = ? AND expires_at > ?", order_key, now).toArray().length > 0) continue;
      this.settle(order_key, committed);
      log("warn", "stale stock reservation settled", { productId: this.productId, orderKey: order_key, committed });
    }
    this.sql.exec("DELETE FROM settled WHERE settled_at < ?", Date.now() - SETTLED_KEPT_MS);
  }

  private available(): number {
    return this.stock - this.reserved;
  }

  /** Whether `key` already has an open entry or was settled: a second reservation under it takes nothing. */
  private known(key: string): boolean {
    return (
      this.sql
        .exec<{ known: number }>(
          `SELECT EXISTS (SELECT 1 FROM reservations WHERE order_key = ?1) OR EXISTS (SELECT 1 FROM settled WHERE order_key = ?1) AS known`,
          key,
        )
        .one().known === 1
    );
  }

  /**
   * A later run of the same request (a retry that took the key over) finds the entry an earlier run left
   * open under `key`, and makes it its own: its expiry is pushed back by a whole TTL, so the alarm cannot give
   * it up while this run writes (a settle-soon asked by the earlier run is pushed back with it; this run's
   * own end settles the entry). No-op for a key already settled.
   */
  private adopt(key: string): void {
    this.sql.exec("UPDATE reservations SET expires_at = max(expires_at, ?) WHERE order_key = ?", Date.now() + RESERVATION_TTL_MS, key);
  }

  /** The first reason a reservation of `quantity` by `userId` is refused, or null. */
  private assess(quantity: number, userId: number): StockRefusal | null {
    if (quantity > this.available()) return "OUT_OF_STOCK";
    if (this.maxPerUser !== null && this.held(userId) + quantity > this.maxPerUser) return "PURCHASE_LIMIT_EXCEEDED";
    return null;
  }

  private refusal(reason: StockRefusal, userId: number): ReserveResult {
    const found = reason !== "PRODUCT_NOT_FOUND";
    return { ok: false, reason, available: found ? this.available() : 0, held: found ? this.held(userId) : 0, maxPerUser: this.maxPerUser };
  }

  private held(userId: number): number {
    return this.sql
      .exec<{ n: number }>(
        `SELECT max(0, coalesce((SELECT quantity FROM purchases WHERE user_id = ?1), 0))
              + coalesce((SELECT sum(quantity) FROM reservations WHERE user_id = ?1 AND kind = 'SALE'), 0) AS n`,
        userId,
      )
      .one().n;
  }

  /** Records an open entry and makes sure the alarm will settle it; a sale counts as reserved at once. */
  private async hold(key: string, entry: Entry): Promise<void> {
    // The TTL is the object's own timer, not business time: a pinned request clock must not expire it early.
    const expiresAt = Date.now() + RESERVATION_TTL_MS;
    this.sql.exec(
      "INSERT INTO reservations (order_key, quantity, expires_at, user_id, kind) VALUES (?, ?, ?, ?, ?)",
      key, entry.quantity, expiresAt, entry.user_id, entry.kind,
    );
    if (entry.kind === "SALE") this.reserved += entry.quantity;
    try {
      await this.settleBy(expiresAt);
    } catch (error) {
      // Without an alarm nothing would ever settle it if the caller vanished: do not keep it.
      this.drop(key);
      throw error;
    }
  }

  private isSettled(orderKey: string): boolean {
    return this.sql.exec("SELECT 1 FROM settled WHERE order_key = ?", orderKey).toArray().length > 0;
  }

  /**
   * Ends an entry. Committed, a sale's units leave `stock` (D1 took them) and count as the buyer's, a
   * restock's come back; once per key however many entries that key had. Otherwise a sale's units are
   * simply free again and a restock is forgotten.
   */
  private settle(key: string, committed: boolean): void {
    // A reload in flight is about to take D1's stock from a snapshot that may or may not hold this entry:
    // settle it once the reload is done, against the state it leaves (which knows which it was). If the
    // reload fails, against the state this life kept (see `resync`); with none (a first load failing), the
    // entry stays stored and the next load reconciles it against D1.
    if (this.loading) {
      const settleAfter = () => {
        if (this.productId !== null) this.settle(key, committed);
      };
      this.loading.then(settleAfter, settleAfter);
      return;
    }
    const entry = this.drop(key);
    if (entry === null || !committed) {
      // Committed in D1 but no longer held here nor counted: the alarm gave it up as never committed before
      // a slow write landed. This object's numbers are off from D1's: take D1's again.
      if (committed && !this.isSettled(key) && this.productId !== null) void this.tryResync(this.productId);
      return;
    }
    // Once per key, however many entries that key had.
    if (this.markSettled(key)) {
      this.stock += entry.kind === "SALE" ? -entry.quantity : entry.quantity;
      this.countPurchase(entry);
    }
  }

  private countPurchase(entry: Entry): void {
    if (entry.user_id === null) return;
    const delta = entry.kind === "SALE" ? entry.quantity : -entry.quantity;
    // Signed, clamped only when read: a cancellation may settle before its own sale does (a lost commit
    // settled later by the alarm), and the two must still cancel out.
    this.sql.exec(
      `INSERT INTO purchases (user_id, quantity) VALUES (?1, ?2)
       ON CONFLICT (user_id) DO UPDATE SET quantity = quantity + ?2`,
      entry.user_id,
      delta,
    );
  }

  /** Records `orderKey` as settled; true if it was not already. */
  private markSettled(orderKey: string): boolean {
    return (
      this.sql.exec("INSERT OR IGNORE INTO settled (order_key, settled_at) VALUES (?, ?) RETURNING 1 AS marked", orderKey, Date.now()).toArray()
        .length > 0
    );
  }

  /** Ends the open entry of `key` (a sale's units are no longer reserved); returns it, or null if none was open. */
  private drop(key: string): Entry | null {
    const entry =
      this.sql.exec<Entry>("DELETE FROM reservations WHERE order_key = ? RETURNING quantity, user_id, kind", key).toArray()[0] ?? null;
    if (entry?.kind === "SALE") this.reserved -= entry.quantity;
    return entry;
  }

  /** When the alarm is next due: the earliest expiry of an entry, or the time earlier admin writes settle. */
  private earliestExpiry(): number | null {
    const at = this.sql.exec<{ at: number | null }>("SELECT min(expires_at) AS at FROM reservations").one().at;
    const writes = this.earlierWritesSettleAt;
    return at === null ? writes : writes === null ? at : Math.min(at, writes);
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

  /** `load`, and first a re-read of D1 that a failed one left due (see `resync`): before deciding anything. */
  private async loadToDecide(productId: number): Promise<boolean> {
    const earlierWritesSettled = this.earlierWritesSettleAt !== null && Date.now() >= this.earlierWritesSettleAt;
    if ((this.decideAfterReload || earlierWritesSettled) && this.productId === productId) await this.resync(productId);
    return this.load(productId);
  }

  /**
   * `load`, skipped once this life has loaded the product: releasing, committing or settling soon what it
   * holds needs no fresh D1 numbers (a commit waits for a re-read in flight, see `settle`), so a re-read
   * failing during an outage does not fail them.
   */
  private loadToSettle(productId: number): Promise<boolean> {
    return this.loadedOnce === productId ? Promise.resolve(true) : this.load(productId);
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
    const leftovers = this.sql.exec<{ order_key: string }>("SELECT order_key FROM reservations").toArray().map((r) => r.order_key);
    const inFlight = this.decreasesInFlight;
    const startedBefore = this.decreasesStarted;
    // Likewise every limit in flight during the read: the tighter of them and D1's (adjust lowers this meanwhile).
    this.limitForLoad = this.limitsInFlight.reduce<number | null>(tighterOf, null);
    const readStartedAt = Date.now();
    const earlier = this.sql
      .exec<{ write_id: string; decrease: number; max_per_user: number | null; started_at: number }>(
        "SELECT write_id, decrease, max_per_user, started_at FROM admin_writes",
      )
      .toArray()
      .filter((w) => !this.ownAdminWrites.has(w.write_id));
    const snapshot = await readProductSnapshot(this.env.DB, productId, leftovers);
    if (!snapshot) return false;
    // Earlier admin writes (of an earlier life, or whose reply was lost): one D1 shows as its latest is in
    // the snapshot, and one begun ADMIN_WRITE_SETTLED_MS before the read has landed or never will; both are
    // forgotten. Any other may still land after the read: counted like a write in flight (its decrease
    // taken, its limit kept if tighter) until the alarm or the next decision after that time reads D1 again.
    const unsettled = earlier.filter((w) => w.write_id !== snapshot.adminWriteId && w.started_at + ADMIN_WRITE_SETTLED_MS > readStartedAt);
    for (const w of earlier) if (!unsettled.includes(w)) this.sql.exec("DELETE FROM admin_writes WHERE write_id = ?", w.write_id);
    this.earlierWritesSettleAt = unsettled.length > 0 ? Math.max(...unsettled.map((w) => w.started_at)) + ADMIN_WRITE_SETTLED_MS : null;
    // D1's stock already holds what its committed entries did; the buyers' counts here do not yet.
    for (const key of snapshot.committed) {
      const entry = this.drop(key);
      if (this.markSettled(key) && entry) this.countPurchase(entry);
    }
    // Each admin decrease in flight at any moment of the read may or may not be in its snapshot: counted as
    // taken, erring low (the adjust reads D1 again after its write).
    const earlierDecreases = unsettled.reduce((n, w) => n + w.decrease, 0);
    this.stock = snapshot.stock - inFlight - (this.decreasesStarted - startedBefore) - earlierDecreases;
    this.maxPerUser = unsettled.reduce((max, w) => tighterOf(max, w.max_per_user), tighterOf(snapshot.maxPerUser, this.limitForLoad));
    this.loads += 1;
    this.reserved = this.sql
      .exec<{ total: number }>("SELECT coalesce(sum(quantity), 0) AS total FROM reservations WHERE kind = 'SALE'")
      .one().total;
    this.sql.exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('product_id', ?)", productId);
    const earliest = this.earliestExpiry();
    if (earliest !== null) await this.settleBy(earliest);
    this.productId = productId;
    this.loadedOnce = productId;
    return true;
  }
}
