import { and, desc, eq } from "drizzle-orm";
import { isConstraintViolation } from "../db/errors";
import { BALANCE_LIMIT, walletTransactions } from "../db/schema";
import { AppError, OutcomeUnknownError } from "../lib/errors";
import { afterCursor, toPage, type Page, type PageQuery } from "../lib/pagination";
import { getUserOrThrow } from "../users/service";
import type { Clock } from "../lib/clock";
import type { Db } from "../env";
import { completeClaim, type Claim } from "../lib/idempotency";
import { createDb } from "../db/client";

export interface TransactionDto {
  id: number;
  type: "CHARGE" | "PAYMENT" | "REFUND";
  amount: number;
  balanceAfter: number;
  orderId: number | null;
  createdAt: string;
}

export interface BalanceDto {
  userId: number;
  balance: number;
  updatedAt: string;
}

const toTransactionDto = (t: typeof walletTransactions.$inferSelect): TransactionDto => ({
  id: t.id,
  type: t.type,
  amount: t.amount,
  balanceAfter: t.balanceAfter,
  orderId: t.orderId,
  createdAt: t.createdAt,
});

export async function getBalance(db: Db, userId: number): Promise<BalanceDto> {
  const user = await getUserOrThrow(db, userId);
  return { userId: user.id, balance: user.balance, updatedAt: user.updatedAt };
}

/** The charge response, `{ userId, balance, transaction }`, rendered by SQLite from one ledger row. */
const chargeResponseSql = (where: string) => `SELECT json_object('userId', t.user_id, 'balance', t.balance_after, 'transaction',
      json_object('id', t.id, 'type', t.type, 'amount', t.amount, 'balanceAfter', t.balance_after,
        'orderId', t.order_id, 'createdAt', t.created_at))
    FROM wallet_transactions t WHERE ${where}`;

// Only right after the ledger INSERT, and only if it inserted (changes() = 1, so last_insert_rowid() is that
// row and not an older one of this connection).
const JUST_CHARGED = chargeResponseSql("t.id = last_insert_rowid() AND changes() = 1");

/** The guarded update: `balance = balance + ?` (no read-modify-write in the Worker), never past the limit. */
const ADD_TO_BALANCE = `UPDATE users SET balance = balance + ?1, updated_at = ?2 WHERE id = ?3 AND balance + ?1 <= ${BALANCE_LIMIT}
  RETURNING balance`;

/**
 * The CHARGE ledger row for the balance update just before it in the same batch; it writes nothing when
 * that update changed no row. `balance_after` is read from the updated row inside the transaction, never
 * computed in the Worker. `created_at` never goes below the user's newest entry: the Worker reads its clock
 * before the batch queues for D1, so without this a later commit could sort as older, and the history's
 * order (and "newest balanceAfter == balance") would disagree with the order the changes were applied in.
 */
const RECORD_CHARGE = `INSERT INTO wallet_transactions (user_id, type, amount, balance_after, order_id, created_at, request_ref)
  SELECT id, 'CHARGE', ?2, balance, NULL, max(?3, coalesce((SELECT max(created_at) FROM wallet_transactions WHERE user_id = ?1), '')), ?4
  FROM users WHERE id = ?1 AND changes() = 1
  RETURNING id`;

/**
 * Adds `amount` to the balance and writes its ledger row in one D1 transaction, so parallel charges all
 * land and none can push the balance past the limit. The response is rendered by SQLite from the new
 * ledger row in the same transaction, and with an idempotency claim it is stored there too: a Worker dying
 * after the commit cannot make a retry charge twice. Plain SQL, not the query builder: a hot write.
 * Returns the response's JSON text.
 */
export async function chargeBalance(
  d1: D1Database,
  clock: Clock,
  userId: number,
  amount: number,
  claim: Claim | null,
): Promise<string> {
  const now = clock.now().toISOString();
  let batch: D1Result<Record<string, unknown>>[];
  try {
    batch = await d1.batch<Record<string, unknown>>([
      d1.prepare(ADD_TO_BALANCE).bind(amount, now, userId),
      d1.prepare(RECORD_CHARGE).bind(userId, amount, now, claim?.effectRef ?? null),
      d1.prepare(`SELECT (${JUST_CHARGED}) AS body`),
      ...(claim ? [completeClaim(d1, claim, JUST_CHARGED)] : []),
    ]);
  } catch (error) {
    // Another run of this same idempotent request (one whose claim this run took over) committed first.
    if (claim && isConstraintViolation(error, "wallet_transactions.request_ref")) {
      const done = await d1
        .prepare(`SELECT (${chargeResponseSql("t.request_ref = ?")}) AS body`)
        .bind(claim.effectRef)
        .first<{ body: string | null }>();
      if (done?.body) return done.body;
    }
    // Anything but a constraint may have committed, or may still (a reply lost while the batch runs): under
    // a claim, keep it, so a retry with the same key continues this charge (same request_ref, found above)
    // instead of starting a new life of the key and charging a second time.
    if (claim && !isConstraintViolation(error, "constraint failed")) {
      throw new OutcomeUnknownError("The charge may or may not have been applied; retry with the same Idempotency-Key", { cause: error });
    }
    throw error;
  }
  const [updated, recorded, response] = batch;
  if (!updated!.results[0] || !recorded!.results[0]) {
    // Users are never deleted, so this read only picks which refusal it was; it cannot race the update.
    await getUserOrThrow(createDb(d1), userId);
    throw new AppError("BALANCE_LIMIT_EXCEEDED", `The balance may not pass ${BALANCE_LIMIT} won`);
  }
  if (claim) claim.storedWithEffect = true;
  return response!.results[0]!.body as string;
}

/** The user's transactions, newest first (ties by id), keyset-paginated. */
export async function listTransactions(db: Db, userId: number, page: PageQuery): Promise<Page<TransactionDto>> {
  await getUserOrThrow(db, userId);
  const rows = await db
    .select()
    .from(walletTransactions)
    .where(
      and(
        eq(walletTransactions.userId, userId),
        afterCursor(walletTransactions.createdAt, walletTransactions.id, page.cursor, `wallet:${userId}`),
      ),
    )
    .orderBy(desc(walletTransactions.createdAt), desc(walletTransactions.id))
    .limit(page.limit + 1);
  return toPage(rows, page.limit, `wallet:${userId}`, toTransactionDto);
}
