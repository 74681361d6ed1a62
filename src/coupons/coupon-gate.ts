import { DurableObject } from "cloudflare:workers";
import { isConstraintViolation } from "../db/errors";
import { describeError, log } from "../lib/log";
import { issueStatements, issuedIds, readGateSnapshot, type CouponTerms, type PendingIssue } from "./issue-ledger";
import { expiryOf, isWithinIssueWindow } from "./rules";
import type { UserCoupon } from "./schemas";

// One object per coupon: the authority on who gets it.
//
// It keeps the coupon's terms, its issued count and the set of holders in its own SQLite storage and
// decides each request from them synchronously, so concurrent requests interleave only between whole
// decisions and can never both take the last piece or both admit one user. Admitted issues are then
// written to D1 in group commits: whatever is admitted while one batch is in flight goes into the next
// single batch. A caller hears back only after its row is committed; if the write fails, its admission
// is undone here. The count here is committed plus admitted-but-uncommitted, so it never trails D1's
// and D1 can take whatever this object promises (rows written behind its back: see settleFailure).

export type IssueRefusal =
  | "COUPON_NOT_FOUND"
  | "COUPON_NOT_ISSUABLE"
  | "COUPON_ALREADY_ISSUED"
  | "COUPON_SOLD_OUT"
  | "USER_NOT_FOUND"
  | "SERVICE_UNAVAILABLE";

export type IssueOutcome = { ok: true; userCoupon: UserCoupon } | { ok: false; code: IssueRefusal };

export interface IssueRequest {
  couponId: number;
  userId: number;
  /** The Worker's clock: the object never reads the wall clock for a business decision. */
  now: string;
}

interface Admission extends PendingIssue {
  settle(outcome: IssueOutcome): void;
}

/** Issues per D1 batch (plus the count's UPDATE): far inside D1's 1,000 queries per invocation. */
const MAX_GROUP = 100;

const UNIQUE_HOLDER = "user_coupons.coupon_id, user_coupons.user_id";
const ISSUED_WITHIN_TOTAL = "coupons_issued_within_total";

const refuse = (code: IssueRefusal): IssueOutcome => ({ ok: false, code });

export class CouponGate extends DurableObject<Env> {
  private readonly sql: SqlStorage;
  /** Set once this instance has derived its state from D1 (and found the coupon). */
  private loaded: Promise<boolean> | null = null;
  private readonly waiting: Admission[] = [];
  private flushing = false;
  private failNextGroup = false;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS coupon (
      id INTEGER PRIMARY KEY, name TEXT NOT NULL, discount_type TEXT NOT NULL, discount_value INTEGER NOT NULL,
      min_order_amount INTEGER NOT NULL, total_quantity INTEGER NOT NULL, issued_count INTEGER NOT NULL,
      issue_starts_at TEXT, issue_ends_at TEXT, valid_days INTEGER NOT NULL,
      CHECK (issued_count >= 0 AND issued_count <= total_quantity))`);
    this.sql.exec("CREATE TABLE IF NOT EXISTS holders (user_id INTEGER PRIMARY KEY)");
  }

  async issue({ couponId, userId, now }: IssueRequest): Promise<IssueOutcome> {
    try {
      if (!(await this.load(couponId))) return refuse("COUPON_NOT_FOUND");
    } catch (error) {
      log("error", "coupon gate could not read D1", { couponId, ...describeError(error) });
      return refuse("SERVICE_UNAVAILABLE");
    }
    // No await from here until the admission is queued: the check and the write are one step.
    const coupon = this.terms();
    const issuedAt = new Date(now);
    if (!isWithinIssueWindow({ issueStartsAt: coupon.issue_starts_at, issueEndsAt: coupon.issue_ends_at }, issuedAt)) {
      return refuse("COUPON_NOT_ISSUABLE");
    }
    if (this.holds(userId)) return refuse("COUPON_ALREADY_ISSUED");
    if (coupon.issued_count >= coupon.total_quantity) return refuse("COUPON_SOLD_OUT");
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

  /** Test seam: the next group commit (and its one-by-one retry) fails inside D1, after its inserts ran. */
  failNextFlush(): void {
    this.failNextGroup = true;
  }

  private load(couponId: number): Promise<boolean> {
    this.loaded ??= this.deriveFromD1(couponId).then(
      (found) => {
        // A coupon created after this lookup must still be found: only a found coupon stays loaded.
        if (!found) this.loaded = null;
        return found;
      },
      (error: unknown) => {
        this.loaded = null;
        throw error;
      },
    );
    return this.loaded;
  }

  // Runs once per life of this instance, before any admission. Storage from an earlier life may hold
  // admissions whose batch failed, or was still in flight when that life ended (and may or may not have
  // landed since): only D1 knows, so the local state is rebuilt from it rather than trusted.
  private async deriveFromD1(couponId: number): Promise<boolean> {
    const snapshot = await readGateSnapshot(this.env.DB, couponId);
    this.ctx.storage.transactionSync(() => {
      this.sql.exec("DELETE FROM coupon");
      this.sql.exec("DELETE FROM holders");
      if (!snapshot) return;
      const c = snapshot.coupon;
      this.sql.exec(
        "INSERT INTO coupon VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        c.id, c.name, c.discount_type, c.discount_value, c.min_order_amount, c.total_quantity, c.issued_count,
        c.issue_starts_at, c.issue_ends_at, c.valid_days,
      );
      for (const userId of snapshot.holders) this.sql.exec("INSERT INTO holders (user_id) VALUES (?)", userId);
    });
    return snapshot !== null;
  }

  private startFlushing(): void {
    if (this.flushing) return;
    this.flushing = true;
    void this.flush();
  }

  private async flush(): Promise<void> {
    try {
      while (this.waiting.length > 0) {
        const group = this.waiting.splice(0, MAX_GROUP);
        const poisoned = this.failNextGroup;
        this.failNextGroup = false;
        await this.commit(group, poisoned).catch((error: unknown) => {
          // Not expected (commit settles its own failures), but no caller may be left waiting forever.
          log("error", "coupon group commit crashed", describeError(error));
          for (const admission of group) admission.settle(refuse("SERVICE_UNAVAILABLE"));
        });
      }
    } finally {
      this.flushing = false;
    }
  }

  private async commit(group: Admission[], poisoned: boolean): Promise<void> {
    const coupon = this.terms();
    const statements = issueStatements(this.env.DB, coupon.id, group);
    if (poisoned) statements.push(this.injectedFailure(coupon.id));
    let ids: (number | null)[];
    try {
      ids = issuedIds(await this.env.DB.batch(statements), group.length);
    } catch (error) {
      // The batch is one transaction, so one row breaking a constraint fails all of it: retry each alone,
      // so it fails alone. Any other failure (D1 unreachable) would only fail the retries too.
      if (group.length > 1 && isConstraintViolation(error, "constraint failed")) {
        for (const admission of group) await this.commit([admission], poisoned);
      } else {
        for (const admission of group) this.settleFailure(admission, error);
      }
      return;
    }
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

  private settleFailure(admission: Admission, error: unknown): void {
    // A UNIQUE or count CHECK failure means D1 holds rows this instance never saw (say, a batch from an
    // earlier life that landed after this one derived its state). D1 is right; adjust to it.
    if (isConstraintViolation(error, UNIQUE_HOLDER)) {
      // The user's row is in D1 and counted there, so keep them as a holder, counted here too.
      admission.settle(refuse("COUPON_ALREADY_ISSUED"));
      return;
    }
    this.undo(admission.userId);
    if (isConstraintViolation(error, ISSUED_WITHIN_TOTAL)) {
      this.sql.exec("UPDATE coupon SET issued_count = total_quantity");
      admission.settle(refuse("COUPON_SOLD_OUT"));
      return;
    }
    log("error", "coupon issue could not be written to D1", { userId: admission.userId, ...describeError(error) });
    admission.settle(refuse("SERVICE_UNAVAILABLE"));
  }

  /** A statement D1 rejects (a CHECK) after the group's inserts, so D1 must roll them back. */
  private injectedFailure(couponId: number): D1PreparedStatement {
    return this.env.DB.prepare("UPDATE coupons SET valid_days = 0 WHERE id = ?").bind(couponId);
  }

  private terms(): CouponTerms {
    return this.sql.exec<CouponTerms>("SELECT * FROM coupon").one();
  }

  private holds(userId: number): boolean {
    return this.sql.exec("SELECT 1 FROM holders WHERE user_id = ?", userId).toArray().length > 0;
  }

  private admit(userId: number): void {
    this.sql.exec("INSERT INTO holders (user_id) VALUES (?)", userId);
    this.sql.exec("UPDATE coupon SET issued_count = issued_count + 1");
  }

  private undo(userId: number): void {
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
    status: "AVAILABLE",
    issuedAt: issue.issuedAt,
    expiresAt: issue.expiresAt,
    usedAt: null,
  };
}
