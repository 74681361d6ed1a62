import { DurableObject } from "cloudflare:workers";
import { isConstraintViolation } from "../db/errors";
import { describeError, log } from "../lib/log";
import {
  issueStatements,
  issuedIds,
  readGateSnapshot,
  readPendingOutcome,
  type CouponTerms,
  type GateSnapshot,
  type PendingIssue,
} from "./issue-ledger";
import { expiryOf, isWithinIssueWindow } from "./rules";
import type { UserCoupon } from "./schemas";
import { ShardQuota } from "./shard-quota";
import { gateName, initialQuota } from "./shards";

// One object per coupon: the authority on who gets it.
//
// It keeps the coupon's terms, its issued count and the set of holders in its own SQLite storage and
// decides each request from them synchronously, so concurrent requests interleave only between whole
// decisions and can never both take the last piece or both admit one user. Admitted issues are then
// written to D1 in group commits: whatever is admitted while one batch is in flight goes into the next
// single batch. A caller hears back only after its row is committed.
//
// Invariant: the step that admits a user also records them in `pending`, and they leave `pending` only
// once their batch's outcome is known. So every holder outside `pending` has a row in D1 and is counted
// there, the object's count is D1's plus the pending ones, and storage can be trusted across lives:
// waking costs O(pending), not O(holders). Admissions wait while a reconciliation (below) runs. D1 stays
// the last line of defence: UNIQUE (coupon_id, user_id) and CHECK (issued_count <= total_quantity) catch
// whatever reaches it behind this object's back.
//
// On each failure:
// - D1 refuses a batch on a constraint (it rolled the whole batch back): the group is retried one by one
//   so a bad row fails alone. UNIQUE: D1 already has the user's row (a late batch, below), so they stay a
//   holder. The count CHECK: D1 is sold out, so the admission is undone and the count set to the total.
//   An unknown user: undone.
// - D1 down, or a batch whose reply is lost (the outcome is unknown): its callers get 503 and their
//   admissions stay pending, holding their pieces. The next request first reconciles, once the groups
//   in flight are done: one D1 batch asks which pending users have a row (kept) and which do not
//   (undone). While D1 stays down that read fails too, and requests answer 503 without admitting anyone.
// - Crash or abort mid group commit, eviction, restart, deploy: storage has every admission, committed
//   or pending. The new life's first request reconciles `pending` the same way, with the coupon row read
//   in the same batch; if D1's issued_count then differs from the object's, something was written
//   behind its back, so the state is rebuilt from D1 once (O(holders)). Storage without STORAGE_VERSION
//   (from before `pending` existed, or never loaded) is rebuilt the same way.
// - A late batch (sent by an earlier life, or before its unknown outcome was reconciled, and landing
//   after the reconciliation undid it): its users are holders in D1 only and D1's count runs ahead of the
//   object's. D1's UNIQUE refuses those users a second row and its CHECK a piece beyond the total, and the
//   object adjusts to each refusal (above); the next reconciliation sees the counts differ and rebuilds.
//
// A coupon of several shards (docs/sharded-coupons.md) has one such object per shard, each deciding for the
// users routed to it exactly as above, against its own quota instead of the total: `coupon.issued_count` is
// then the shard's own count (issued and pending). D1's coupon row counts every shard, and each shard's
// batch also bumps the shard's own row of coupon_shard_counts, which is what its reconciliation compares
// with (a late batch is caught as above; a CHECK refusal means the whole coupon is sold out). A shard with
// no free quota parks its requests and asks its siblings, one at a time, for just as many pieces as it has
// parked requests (shard-quota.ts: a durable, exactly-once transfer), so every piece in transit is bound for
// an admission; when every sibling has answered none, the parked requests are sold out and the shard refuses
// at once for DRY_MS. A sibling that cannot answer makes it 503 instead: its pieces might be in transit.

/**
 * The layout of this object's storage: storage without this marker (or with another) is rebuilt from D1 on
 * waking. Bump it with any change to the tables below, except a new column of `coupon`: that row is
 * rewritten from D1 by the reconciliation every life runs before its first admission.
 */
export const STORAGE_VERSION = 2;

export type IssueRefusal =
  | "COUPON_NOT_FOUND"
  | "COUPON_NOT_ISSUABLE"
  | "COUPON_ALREADY_ISSUED"
  | "COUPON_SOLD_OUT"
  | "USER_NOT_FOUND"
  | "SERVICE_UNAVAILABLE";

export type IssueOutcome =
  | { ok: true; userCoupon: UserCoupon }
  | { ok: false; code: IssueRefusal }
  /** The Worker routed with another shard count than the coupon's: route again with `shards`. */
  | { ok: false; code: "MISROUTED"; shards: number };

export interface IssueRequest {
  couponId: number;
  userId: number;
  /** The Worker's clock: the object never reads the wall clock for a business decision. */
  now: string;
  /** How many shards the Worker believes the coupon has (default 1), and this object's shard among them. */
  shards?: number;
  shard?: number;
}

export interface GiveRequest {
  couponId: number;
  /** The giver's shard (this object's). */
  shard: number;
  taker: number;
  transferId: string;
  /** Pieces asked for; 0 only settles the transfer (what was given, or nothing ever). */
  need: number;
}

export interface ShardState {
  shard: number;
  quota: number | null;
  /** Issued and pending here. */
  issued: number;
  pending: number;
  transfersGiven: number;
  piecesGiven: number;
  openIntents: number;
  /** Issue requests this life has answered or is answering (not kept across restarts). */
  requests: number;
}

interface Parked {
  request: IssueRequest;
  settle(outcome: IssueOutcome | Promise<IssueOutcome>): void;
}

interface Admission extends PendingIssue {
  settle(outcome: IssueOutcome): void;
}

/** Issues per D1 batch (plus the count's UPDATE): far inside D1's 1,000 queries per invocation. */
const MAX_GROUP = 100;
/** Holders per INSERT when rebuilding from D1. */
const HOLDERS_PER_INSERT = 10_000;

const UNIQUE_HOLDER = "user_coupons.coupon_id, user_coupons.user_id";
const ISSUED_WITHIN_TOTAL = "coupons_issued_within_total";

/** How long a shard that found every sibling dry refuses without asking them again. */
const DRY_MS = 1_000;
/** When a shard's alarm settles the transfers it could not finish (a lost reply, its own crash). */
const RESOLVE_AFTER_MS = 1_000;

const refuse = (code: IssueRefusal): { ok: false; code: IssueRefusal } => ({ ok: false, code });

export class CouponGate extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  /** Storage may hold admissions whose outcome only D1 knows: so at the start of each life, and after an unknown outcome. */
  private stale = true;
  private reconciling = false;
  /** The latest reconciliation: true when it found the coupon. */
  private reconciled: Promise<boolean> = Promise.resolve(false);
  private readonly waiting: Admission[] = [];
  private flushing = false;
  private drained: Promise<void> = Promise.resolve();
  /** This object's shard (0 for a coupon of one shard), from its requests or its quota record. */
  private shard = 0;
  private readonly quota: ShardQuota;
  /** Sharded only: requests waiting for quota from siblings, and their users (no user is parked twice). */
  private readonly parked: Parked[] = [];
  private readonly parkedUsers = new Map<number, Promise<IssueOutcome>>();
  private toppingUp = false;
  private dryUntil = 0;
  private requests = 0;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.quota = new ShardQuota(ctx.storage);
    this.shard = this.quota.identity()?.shard ?? 0;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS coupon (
      id INTEGER PRIMARY KEY, name TEXT NOT NULL, discount_type TEXT NOT NULL, discount_value INTEGER NOT NULL,
      min_order_amount INTEGER NOT NULL, total_quantity INTEGER NOT NULL, issued_count INTEGER NOT NULL,
      issue_starts_at TEXT, issue_ends_at TEXT, valid_days INTEGER NOT NULL,
      CHECK (issued_count >= 0 AND issued_count <= total_quantity))`);
    const columns = this.sql.exec<{ name: string }>("PRAGMA table_info(coupon)").toArray().map((c) => c.name);
    // Objects from before capped PERCENT coupons: the column is added here and filled at the next reconciliation.
    if (!columns.includes("max_discount_amount")) this.sql.exec("ALTER TABLE coupon ADD COLUMN max_discount_amount INTEGER");
    if (!columns.includes("shards")) this.sql.exec("ALTER TABLE coupon ADD COLUMN shards INTEGER NOT NULL DEFAULT 1");
    this.sql.exec("CREATE TABLE IF NOT EXISTS holders (user_id INTEGER PRIMARY KEY)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS pending (user_id INTEGER PRIMARY KEY)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)");
  }

  async issue(request: IssueRequest): Promise<IssueOutcome> {
    this.requests++;
    return this.decide(request);
  }

  private async decide(request: IssueRequest): Promise<IssueOutcome> {
    const { couponId, userId, now } = request;
    // Every request for one object names the same shard: the object's name is made from it.
    this.shard = request.shard ?? 0;
    if (this.stale || this.reconciling) {
      const unready = await this.ready(couponId);
      if (unready) return unready;
    }
    // No await from here until the admission is queued: the check and the write are one step.
    const coupon = this.terms();
    if (coupon.shards !== (request.shards ?? 1)) return { ok: false, code: "MISROUTED", shards: coupon.shards };
    const issuedAt = new Date(now);
    if (!isWithinIssueWindow({ issueStartsAt: coupon.issue_starts_at, issueEndsAt: coupon.issue_ends_at }, issuedAt)) {
      return refuse("COUPON_NOT_ISSUABLE");
    }
    if (this.holds(userId)) return refuse("COUPON_ALREADY_ISSUED");
    if (coupon.issued_count >= this.capacity(coupon)) {
      if (coupon.shards === 1) return refuse("COUPON_SOLD_OUT");
      // The same user again while parked: their first request decides, then this one is answered like a repeat.
      const first = this.parkedUsers.get(userId);
      if (first) return first.then(() => this.decide(request));
      if (Date.now() < this.dryUntil) return refuse("COUPON_SOLD_OUT");
      return this.park(request);
    }
    this.admit(userId);
    return new Promise<IssueOutcome>((settle) => {
      this.waiting.push({
        userId,
        issuedAt: issuedAt.toISOString(),
        expiresAt: expiryOf(issuedAt, coupon.valid_days).toISOString(),
        settle,
      });
      this.startFlushing();
    });
  }

  /**
   * For the audit, read-only (it never starts a reconciliation): the gate's count, or null when it is not
   * live for `couponId` (it reconciles with D1 before its next admission). `settled`: no reconciliation or
   * batch running and nothing pending, when the count must equal D1's issued_count.
   */
  async auditView(couponId: number): Promise<{ issuedCount: number; settled: boolean } | null> {
    if (this.stale || !this.trusts(couponId)) return null;
    const pending = this.sql.exec<{ n: number }>("SELECT count(*) AS n FROM pending").one().n;
    return { issuedCount: this.terms().issued_count, settled: !this.reconciling && !this.flushing && pending === 0 };
  }

  /** Sharded: a sibling asks for pieces of this shard's free quota (shard-quota.ts, step 2). */
  async give({ couponId, shard, taker, transferId, need }: GiveRequest): Promise<number> {
    this.shard = shard;
    const unready = this.stale || this.reconciling ? await this.ready(couponId) : null;
    if (unready) throw new Error(`coupon gate ${couponId}:${shard} cannot give: it could not load`);
    const coupon = this.terms();
    return this.quota.give(transferId, taker, need, this.capacity(coupon) - coupon.issued_count);
  }

  /** Read-only: what this shard holds, for admins and the bench. */
  async shardState(couponId: number, shard: number): Promise<ShardState> {
    this.shard = shard;
    await this.ready(couponId);
    const coupon = this.sql.exec<CouponTerms>("SELECT * FROM coupon").toArray()[0];
    const given = this.quota.givenSoFar();
    return {
      shard,
      quota: this.quota.pieces(),
      issued: coupon?.issued_count ?? 0,
      pending: this.sql.exec<{ n: number }>("SELECT count(*) AS n FROM pending").one().n,
      transfersGiven: given.transfers,
      piecesGiven: given.pieces,
      openIntents: this.quota.openIntents().length,
      requests: this.requests,
    };
  }

  /** Settles the transfers this shard could not finish: at-least-once, and each settles once. */
  override async alarm(): Promise<void> {
    const identity = this.quota.identity();
    if (!identity) return;
    this.shard = identity.shard;
    try {
      await this.resolveIntents(identity.couponId);
    } catch (error) {
      log("error", "coupon shard could not settle its transfers", { ...identity, ...describeError(error) });
      await this.ctx.storage.setAlarm(Date.now() + 5 * RESOLVE_AFTER_MS);
    }
  }

  /** Null once no reconciliation is running or due (one may start while this request waits), else the refusal. */
  private async ready(couponId: number): Promise<{ ok: false; code: IssueRefusal } | null> {
    while (this.stale || this.reconciling) {
      try {
        if (!(await this.reconcile(couponId))) return refuse("COUPON_NOT_FOUND");
      } catch (error) {
        log("error", "coupon gate could not read D1", { couponId, ...describeError(error) });
        return refuse("SERVICE_UNAVAILABLE");
      }
    }
    return null;
  }

  /** The pieces this object may hold in all: the total, or a shard's quota. */
  private capacity(coupon: CouponTerms): number {
    return coupon.shards === 1 ? coupon.total_quantity : (this.quota.pieces() ?? 0);
  }

  private park(request: IssueRequest): Promise<IssueOutcome> {
    const outcome = new Promise<IssueOutcome>((settle) => this.parked.push({ request, settle }));
    this.parkedUsers.set(request.userId, outcome);
    if (!this.toppingUp) void this.topUp(request.couponId);
    return outcome;
  }

  // Asks the siblings one at a time, each for what is still parked, and hands what arrives to the parked
  // requests in order. One at a time, and no more than is parked: every piece in transit is bound for an
  // admission, so a sibling that finds everyone dry may rightly say sold out.
  private async topUp(couponId: number): Promise<void> {
    this.toppingUp = true;
    let unanswered = false;
    try {
      await this.askSiblings(couponId).catch((error: unknown) => {
        log("error", "coupon shard could not top up", { couponId, shard: this.shard, ...describeError(error) });
        unanswered = true;
      });
    } finally {
      // No await from here on: a request parked after this would wait for a top-up that is over.
      this.toppingUp = false;
      const rest = this.parked.splice(0);
      if (rest.length > 0 && !unanswered) this.dryUntil = Date.now() + DRY_MS;
      for (const { request, settle } of rest) {
        this.parkedUsers.delete(request.userId);
        settle(refuse(unanswered ? "SERVICE_UNAVAILABLE" : "COUPON_SOLD_OUT"));
      }
    }
  }

  /** Throws when a sibling's answer is unknown: what is left parked then hears 503, not sold out. */
  private async askSiblings(couponId: number): Promise<void> {
    const shards = this.terms().shards;
    let unanswered: unknown = null;
    await this.resolveIntents(couponId).catch((error: unknown) => (unanswered = error));
    this.unpark();
    // Round the siblings from a random one until a whole round in a row gave nothing: every sibling was then
    // dry when asked, with any piece moving meanwhile bound for a parked request.
    let giver = Math.floor(Math.random() * shards);
    for (let dry = 0; dry < shards - 1 && this.parked.length > 0; ) {
      giver = (giver + 1) % shards;
      if (giver === this.shard) continue;
      const transferId = this.quota.openIntent(giver);
      await this.ctx.storage.setAlarm(Date.now() + RESOLVE_AFTER_MS);
      let pieces = 0;
      try {
        pieces = await this.sibling(couponId, giver).give({
          couponId,
          shard: giver,
          taker: this.shard,
          transferId,
          need: this.parked.length,
        });
        this.quota.credit(transferId, pieces);
      } catch (error) {
        // Whether it gave is unknown: the intent stays open, and the alarm asks again.
        unanswered = error;
      }
      dry = pieces > 0 ? 0 : dry + 1;
      this.unpark();
    }
    if (unanswered) throw unanswered;
  }

  /** Decides again, in order, for as many parked requests as there are free pieces. */
  private unpark(): void {
    const coupon = this.terms();
    const free = this.capacity(coupon) - coupon.issued_count;
    for (const { request, settle } of this.parked.splice(0, Math.max(0, free))) {
      this.parkedUsers.delete(request.userId);
      settle(this.decide(request));
    }
  }

  /** Asks each giver of a transfer still open for its outcome (need 0: it gives nothing new) and credits it. */
  private async resolveIntents(couponId: number): Promise<void> {
    for (const { transfer_id: transferId, giver } of this.quota.openIntents()) {
      const pieces = await this.sibling(couponId, giver).give({ couponId, shard: giver, taker: this.shard, transferId, need: 0 });
      this.quota.credit(transferId, pieces);
    }
  }

  private sibling(couponId: number, shard: number): DurableObjectStub<CouponGate> {
    return this.env.COUPON_GATE.getByName(gateName(couponId, shard));
  }

  /** Starts a reconciliation if one is due and none is running; resolves with the running or latest one. */
  private reconcile(couponId: number): Promise<boolean> {
    if (this.stale && !this.reconciling) {
      this.stale = false;
      this.reconciling = true;
      this.reconciled = this.reconcilePending(couponId).then(
        (found) => {
          this.reconciling = false;
          // A coupon created after this lookup must still be found: only a found coupon is settled.
          if (!found) this.stale = true;
          return found;
        },
        (error: unknown) => {
          this.reconciling = false;
          this.stale = true;
          throw error;
        },
      );
    }
    return this.reconciled;
  }

  // Learns the outcome of every pending admission from D1 and applies it: committed stays a holder,
  // anything else is undone. Runs when no batch is in flight and no request can admit, so the object's
  // count must then equal D1's (the coupon's, or this shard's own); when it does not, D1 is right and the
  // state is rebuilt from it.
  private async reconcilePending(couponId: number): Promise<boolean> {
    while (this.flushing) await this.drained;
    if (!this.trusts(couponId)) return this.rebuild(await readGateSnapshot(this.env.DB, couponId, this.shard));
    const pending = this.sql.exec<{ user_id: number }>("SELECT user_id FROM pending").toArray().map((r) => r.user_id);
    const sharded = this.terms().shards > 1;
    const outcome = await readPendingOutcome(this.env.DB, couponId, pending, sharded ? this.shard : undefined);
    if (!outcome) return this.rebuild(null);
    this.ctx.storage.transactionSync(() => {
      for (const userId of pending) {
        if (outcome.committed.has(userId)) this.confirm([userId]);
        else this.undo(userId);
      }
    });
    const count = this.terms().issued_count;
    // D1's coupon row counts every shard; a shard compares its own count, kept beside it.
    const d1Count = sharded ? outcome.shardIssuedCount : outcome.coupon.issued_count;
    if (count !== d1Count) {
      log("warn", "coupon gate disagrees with D1; rebuilding from it", {
        couponId,
        shard: this.shard,
        objectCount: count,
        d1Count,
      });
      return this.rebuild(await readGateSnapshot(this.env.DB, couponId, this.shard));
    }
    this.ctx.storage.transactionSync(() => {
      this.sql.exec("DELETE FROM coupon");
      this.insertTerms({ ...outcome.coupon, issued_count: count });
    });
    return true;
  }

  /** True when storage was written by this layout for this coupon, so only `pending` needs D1. */
  private trusts(couponId: number): boolean {
    const version = this.sql.exec<{ value: number }>("SELECT value FROM meta WHERE key = 'version'").toArray()[0];
    const coupon = this.sql.exec<{ id: number }>("SELECT id FROM coupon").toArray()[0];
    return version?.value === STORAGE_VERSION && coupon?.id === couponId;
  }

  /**
   * Replaces the whole state with D1's (O(holders)); an unknown coupon leaves it empty. A shard's snapshot
   * holds only its own users (read for `this.shard`); it keeps its quota and transfers, which D1 does not
   * know: a new shard starts its quota.
   */
  private rebuild(snapshot: GateSnapshot | null): boolean {
    this.ctx.storage.transactionSync(() => {
      for (const table of ["coupon", "holders", "pending", "meta"]) this.sql.exec(`DELETE FROM ${table}`);
      if (!snapshot) return;
      const { coupon, holders } = snapshot;
      this.insertTerms({ ...coupon, issued_count: coupon.shards === 1 ? coupon.issued_count : holders.length });
      if (coupon.shards > 1 && this.shard < coupon.shards) {
        this.quota.start(coupon.id, this.shard, initialQuota(coupon.total_quantity, coupon.shards, this.shard));
      }
      for (let i = 0; i < holders.length; i += HOLDERS_PER_INSERT) {
        const chunk = JSON.stringify(holders.slice(i, i + HOLDERS_PER_INSERT));
        this.sql.exec("INSERT INTO holders (user_id) SELECT value FROM json_each(?)", chunk);
      }
      this.sql.exec("INSERT INTO meta (key, value) VALUES ('version', ?)", STORAGE_VERSION);
    });
    return snapshot !== null;
  }

  private insertTerms(c: CouponTerms): void {
    this.sql.exec(
      `INSERT INTO coupon (id, name, discount_type, discount_value, min_order_amount, max_discount_amount, total_quantity,
         issued_count, issue_starts_at, issue_ends_at, valid_days, shards) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      c.id, c.name, c.discount_type, c.discount_value, c.min_order_amount, c.max_discount_amount, c.total_quantity,
      c.issued_count, c.issue_starts_at, c.issue_ends_at, c.valid_days, c.shards,
    );
  }

  private startFlushing(): void {
    if (this.flushing) return;
    this.flushing = true;
    this.drained = this.flush();
  }

  private async flush(): Promise<void> {
    try {
      while (this.waiting.length > 0) {
        const group = this.waiting.splice(0, MAX_GROUP);
        await this.commit(group).catch((error: unknown) => this.unknownOutcome(group, error));
      }
    } finally {
      this.flushing = false;
    }
  }

  private async commit(group: Admission[]): Promise<void> {
    const coupon = this.terms();
    let ids: (number | null)[];
    try {
      const statements = issueStatements(this.env.DB, coupon.id, group, coupon.shards > 1 ? this.shard : undefined);
      ids = issuedIds(await this.env.DB.batch(statements), group.length);
    } catch (error) {
      if (!isConstraintViolation(error, "constraint failed")) return this.unknownOutcome(group, error);
      // D1 rolled the batch back, and one row breaking a constraint fails all of it: retry each alone,
      // so it fails alone.
      if (group.length > 1) {
        for (const admission of group) await this.commit([admission]);
      } else {
        this.refused(group[0]!, error);
      }
      return;
    }
    this.confirm(group.filter((_, i) => ids[i] != null).map((a) => a.userId));
    group.forEach((admission, i) => {
      const id = ids[i];
      if (id === null || id === undefined) {
        this.undo(admission.userId);
        admission.settle(refuse("USER_NOT_FOUND"));
      } else {
        admission.settle({ ok: true, userCoupon: toUserCoupon(coupon, id, admission) });
      }
    });
  }

  /** D1 refused this one admission on a constraint, so it wrote nothing. */
  private refused(admission: Admission, error: unknown): void {
    // A UNIQUE or count CHECK failure means D1 holds rows this object never saw (a late batch). D1 is
    // right; adjust to it.
    if (isConstraintViolation(error, UNIQUE_HOLDER)) {
      // The user's row is in D1 and counted there, so keep them as a holder, counted here too.
      this.confirm([admission.userId]);
      admission.settle(refuse("COUPON_ALREADY_ISSUED"));
      return;
    }
    this.undo(admission.userId);
    if (isConstraintViolation(error, ISSUED_WITHIN_TOTAL)) {
      // D1 holds every piece of the coupon: this object has none left to admit or to give.
      if (this.terms().shards === 1) this.sql.exec("UPDATE coupon SET issued_count = total_quantity");
      else {
        this.quota.shrinkTo(this.terms().issued_count);
        this.dryUntil = Date.now() + DRY_MS;
      }
      admission.settle(refuse("COUPON_SOLD_OUT"));
      return;
    }
    log("error", "coupon issue refused by D1", { userId: admission.userId, ...describeError(error) });
    admission.settle(refuse("SERVICE_UNAVAILABLE"));
  }

  /** The batch may or may not have committed: keep the admissions pending until a reconciliation asks D1. */
  private unknownOutcome(group: Admission[], error: unknown): void {
    log("error", "coupon group commit outcome unknown", { size: group.length, ...describeError(error) });
    this.stale = true;
    for (const admission of group) admission.settle(refuse("SERVICE_UNAVAILABLE"));
  }

  private terms(): CouponTerms {
    return this.sql.exec<CouponTerms>("SELECT * FROM coupon").one();
  }

  private holds(userId: number): boolean {
    return this.sql.exec("SELECT 1 FROM holders WHERE user_id = ?", userId).toArray().length > 0;
  }

  private admit(userId: number): void {
    this.sql.exec("INSERT INTO holders (user_id) VALUES (?)", userId);
    this.sql.exec("INSERT INTO pending (user_id) VALUES (?)", userId);
    this.sql.exec("UPDATE coupon SET issued_count = issued_count + 1");
  }

  /** Their rows are in D1: they stay holders, no longer pending. */
  private confirm(userIds: number[]): void {
    this.sql.exec("DELETE FROM pending WHERE user_id IN (SELECT value FROM json_each(?))", JSON.stringify(userIds));
  }

  /** Takes back a pending admission; a no-op for one already settled, so it is never undone twice. */
  private undo(userId: number): void {
    if (this.sql.exec("DELETE FROM pending WHERE user_id = ? RETURNING user_id", userId).toArray().length === 0) return;
    this.sql.exec("DELETE FROM holders WHERE user_id = ?", userId);
    this.sql.exec("UPDATE coupon SET issued_count = issued_count - 1");
  }
}

function toUserCoupon(coupon: CouponTerms, id: number, issue: PendingIssue): UserCoupon {
  return {
    id,
    couponId: coupon.id,
    userId: issue.userId,
    name: coupon.name,
    discountType: coupon.discount_type,
    discountValue: coupon.discount_value,
    minOrderAmount: coupon.min_order_amount,
    maxDiscountAmount: coupon.max_discount_amount,
    status: "AVAILABLE",
    issuedAt: issue.issuedAt,
    expiresAt: issue.expiresAt,
    usedAt: null,
  };
}
