import { and, desc, eq, sql, type SQL } from "drizzle-orm";
import { isConstraintViolation } from "../db/errors";
import { BALANCE_LIMIT, users, walletTransactions } from "../db/schema";
import { AppError } from "../lib/errors";
import { afterCursor, toPage, type Page, type PageQuery } from "../lib/pagination";
import { getUserOrThrow } from "../users/service";
import type { Clock } from "../lib/clock";
import type { Db } from "../env";
import { completeClaimQuery, type Claim } from "../lib/idempotency";

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

/**
 * Adds `amount` to the balance and writes its ledger row in one D1 transaction. The update is a
 * guarded `balance = balance + ?` (no read-modify-write in the Worker), so parallel charges all land
 * and none can push the balance past the limit. The response is rendered by SQLite from the new ledger
 * row in the same transaction, and with an idempotency claim it is stored there too: a Worker dying
 * after the commit cannot make a retry charge twice. Returns the response's JSON text.
 */
export async function chargeBalance(
  db: Db,
  clock: Clock,
  userId: number,
  amount: number,
  claim: Claim | null,
): Promise<string> {
  const now = clock.now().toISOString();
  // Only right after the ledger INSERT, and only if it inserted (changes() = 1, so last_insert_rowid()
  // is that row and not an older one of this connection).
  const responseSql = chargeResponseSql(sql`t.id = last_insert_rowid() AND changes() = 1`);
  let batch;
  try {
    batch = await db.batch([
      db
        .update(users)
        .set({ balance: sql`${users.balance} + ${amount}`, updatedAt: now })
        .where(and(eq(users.id, userId), sql`${users.balance} + ${amount} <= ${BALANCE_LIMIT}`))
        .returning({ balance: users.balance }),
      recordCharge(db, userId, amount, now, claim?.effectRef ?? null),
      db.all<{ body: string }>(sql`SELECT (${responseSql}) AS body`),
      ...(claim ? [completeClaimQuery(db, claim, responseSql)] : []),
    ]);
  } catch (error) {
    // Another run of this same idempotent request (one whose claim this run took over) committed first.
    if (claim && isConstraintViolation(error, "wallet_transactions.request_ref")) {
      const [done] = await db.all<{ body: string }>(
        sql`SELECT (${chargeResponseSql(sql`t.request_ref = ${claim.effectRef}`)}) AS body`,
      );
      if (done?.body) return done.body;
    }
    throw error;
  }
  const [updated, recorded, response] = batch;
  if (!updated[0] || !recorded[0]) {
    // Users are never deleted, so this read only picks which refusal it was; it cannot race the update.
    await getUserOrThrow(db, userId);
    throw new AppError("BALANCE_LIMIT_EXCEEDED", `The balance may not pass ${BALANCE_LIMIT} won`);
  }
  if (claim) claim.storedWithEffect = true;
  return response[0]!.body;
}

/** The charge response, `{ userId, balance, transaction }`, rendered by SQLite from one ledger row. */
function chargeResponseSql(where: SQL) {
  return sql`SELECT json_object('userId', t.user_id, 'balance', t.balance_after, 'transaction',
      json_object('id', t.id, 'type', t.type, 'amount', t.amount, 'balanceAfter', t.balance_after,
        'orderId', t.order_id, 'createdAt', t.created_at))
    FROM wallet_transactions t WHERE ${where}`;
}

/**
 * The CHARGE ledger row for the balance update just before it in the same batch; it writes nothing
 * when that update changed no row. `balance_after` is read from the updated row inside the
 * transaction, never computed in the Worker. `created_at` never goes below the user's newest entry:
 * the Worker reads its clock before the batch queues for D1, so without this a later commit could
 * sort as older, and the history's order (and "newest balanceAfter == balance") would disagree with
 * the order the changes were applied in.
 */
function recordCharge(db: Db, userId: number, amount: number, now: string, requestRef: string | null) {
  const ledger = walletTransactions;
  const newestForUser = sql`(SELECT MAX(${ledger.createdAt}) FROM ${ledger} WHERE ${ledger.userId} = ${users.id})`;
  // Drizzle's INSERT ... SELECT names every column in table order (id, user_id, type, amount,
  // balance_after, order_id, created_at, request_ref); NULL lets SQLite assign the id.
  return db
    .insert(ledger)
    .select(
      sql`SELECT NULL, ${users.id}, 'CHARGE', ${amount}, ${users.balance}, NULL,
        MAX(${now}, COALESCE(${newestForUser}, '')), ${requestRef}
      FROM ${users} WHERE ${users.id} = ${userId} AND changes() = 1`,
    )
    .returning();
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
