import { and, eq, lte } from "drizzle-orm";
import type { Context } from "hono";
import { createMiddleware } from "hono/factory";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { createDb } from "../db/client";
import { idempotencyKeys } from "../db/schema";
import { callerScope } from "./auth";
import { DAY_MS } from "./clock";
import { AppError, OutcomeUnknownError } from "./errors";
import { describeError, log } from "./log";
import { IdempotencyKey, validationFailed } from "./openapi";
import { PROBLEM_CONTENT_TYPE, problemResponse } from "./problem";
import { sha256Hex } from "./sha256";
import type { AppEnv, Db } from "../env";

/*
 * Idempotent writes, for any route (charge, orders, ...):
 *
 *   async (c) => idempotent(c, async () => c.json(await doTheWrite(...), 200))
 *
 * Without an `Idempotency-Key` header the handler simply runs. With one, the first request for a
 * (caller scope, key) pair claims it in D1 and runs the handler; its response is stored and every later
 * request with the same key, caller and fingerprint (method + path + raw body) within 24 h gets that
 * response again, byte for byte, with `Idempotent-Replayed: true`, and the handler does not run.
 *
 * - same key, other fingerprint            -> 422 IDEMPOTENCY_KEY_REUSED
 * - same key while the first still runs    -> 409 IDEMPOTENCY_IN_PROGRESS
 * - the handler throws an AppError (4xx)   -> the problem response is stored and replayed like a success
 * - the handler throws anything else (5xx) -> the claim is released (unlocked, not deleted): a retry with the
 *                                             same body runs at once, continuing the key's life (another
 *                                             body is still 422)
 * - the Worker dies mid-handler            -> the claim stays IN_PROGRESS until `locked_until`, then the
 *                                             next request with the same fingerprint takes it over
 *
 * Use it only behind `authenticate` (the scope is the caller), and only around a handler whose effect
 * commits in one D1 transaction. A crash after that commit but before the response is stored cannot be
 * told apart from one before it, so after `locked_until` the handler would run again, unless the handler
 * closes that gap: it gets the claim and can add `completeClaim(...)` to its own batch, so the effect and
 * the stored response commit together (orders do this).
 * A handler can also make the claim itself (`claimInHandler`): an order of one product is claimed by that
 * product's stock object, for a whole group of orders in one D1 batch, before it reserves anything. The
 * claim is the same row with the same meaning; only who writes it, and how many at once, differ.
 * Rows expire after 24 h; `purgeExpiredIdempotencyKeys` (cron) deletes them.
 */

export const IDEMPOTENCY_TTL_MS = DAY_MS;
/** How long a claim protects a running handler; longer than any handler should take. */
export const IDEMPOTENCY_LOCK_MS = 60_000;
export const REPLAYED_HEADER = "Idempotent-Replayed";

/**
 * Route middleware for the writes that take an `Idempotency-Key` (after `limitWrites`): a malformed key is
 * refused before anything else the route checks, its body included, as a header validator would refuse
 * it, but reading that one header rather than copying all of them.
 */
export const checkIdempotencyKey = createMiddleware<AppEnv>(async (c, next) => {
  assertValidKey(c.req.header("Idempotency-Key"));
  await next();
});

function assertValidKey(key: string | undefined): void {
  if (key === undefined) return;
  const checked = IdempotencyKey.safeParse(key);
  if (!checked.success) throw validationFailed(checked.error.issues, "idempotency-key");
}

export type KeyRow = typeof idempotencyKeys.$inferSelect;

export interface IdempotentOptions {
  /**
   * A refusal the route can give before running anything (a product this isolate knows is sold out).
   * For a new key it is stored as the key's result in one write; a key in use is answered from its row,
   * read in the same batch (see `storeEarlyRefusal`).
   */
  refuseEarly?: () => AppError | null;
  /**
   * The handler again, making the claim itself in its first D1 batch (see `claimNewKeys`), tried first. It
   * records the claim it made in `toMake.made`; it throws `KeyInUse` when the key already had a row, which
   * answers if it carries a final one (a replay, or 422), and else the usual path (409, a takeover, a new
   * life) does. A refusal (4xx) thrown before any claim was made is stored as the key's result in one write,
   * as a refusal known early is.
   */
  claimInHandler?: (toMake: ClaimToMake) => Promise<Response>;
}

/** A claim for a handler to make (`claimInHandler`): the row `claimNewKeys` inserts if the key has none. */
export interface ClaimToMake extends ClaimRequest {
  createdAt: string;
  expiresAt: string;
  /** Set by the handler once its batch made the claim. */
  made: Claim | null;
}

/**
 * The key of a `claimInHandler` run already had a row: nothing was claimed, nothing done. With the row when
 * the handler read it (`keysInUse`), so a final one is answered from it (a replay, or 422) without reading
 * it again.
 */
export class KeyInUse extends Error {
  constructor(readonly row?: KeyRow) {
    super("the idempotency key already has a row");
  }
}

/**
 * Runs `handler` at most once per (caller scope, Idempotency-Key) within 24 h and returns the Response to send.
 * Generic only so a typed route handler keeps its response type: a replay is the stored copy of what
 * `handler` (or the problem response of its AppError) returned the first time.
 */
export async function idempotent<R extends Response>(
  c: Context<AppEnv>,
  handler: (claim: Claim | null) => Promise<R>,
  options: IdempotentOptions = {},
): Promise<R> {
  const key = c.req.header("Idempotency-Key");
  if (key === undefined) {
    const early = options.refuseEarly?.();
    if (early) throw early;
    return handler(null);
  }
  assertValidKey(key);
  const caller = c.get("caller");
  if (!caller) throw new Error("idempotent() needs an authenticated caller");

  const db = c.get("db");
  const now = c.get("clock").now();
  const request = {
    scope: callerScope(caller),
    key,
    requestHash: await requestFingerprint(c.req.method, c.req.path, await c.req.text()),
    lockedUntil: new Date(now.getTime() + IDEMPOTENCY_LOCK_MS).toISOString(),
    owner: crypto.randomUUID(),
  };

  const early = options.refuseEarly?.();
  if (early) {
    const refused = await storeEarlyRefusal(c, request, now, early);
    if (refused) return refused as R;
  }
  // (A key the early refusal found in use, and that a retry may take over, goes the usual path.)
  if (options.claimInHandler && !early) {
    const answered = await runClaimingHandler(c, db, request, now, options.claimInHandler);
    if (answered) return answered as R;
  }

  // A claim released by a failing owner (or expiring) between our two reads is simply claimed again.
  for (let attempt = 0; attempt < 3; attempt++) {
    const claim = await tryClaim(c.env.DB, request, now);
    if (claim) return (await runClaimed(c, db, claim, handler)) as R;
    const existing = await readKey(c.env.DB, request);
    if (existing && !claimable(existing, request, now)) return answerExisting(c, existing, request) as R;
  }
  throw new AppError("IDEMPOTENCY_IN_PROGRESS", "A request with this idempotency key is still running");
}

/**
 * A refusal known before anything runs, for a key never seen: stored as the key's result in one write
 * (no claim, then no second write to complete it). A key already in use is answered from its row, read in
 * the same batch (a replay, 409 or 422, as the usual path would), unless a retry may take it over (crashed,
 * released or expired): null then, and the usual path claims it. A refusal caused by another run of the
 * same key (its hold took the last unit) always meets that run's row here, even if the run has failed
 * meanwhile: a claim is unlocked on failure, never deleted (`release`).
 */
async function storeEarlyRefusal(c: Context<AppEnv>, request: ClaimRequest, now: Date, refusal: AppError): Promise<Response | null> {
  const response = problemResponse(c, refusal);
  const body = await response.text();
  const d1 = c.env.DB;
  // The row first (one transaction): if it exists, the insert below does nothing, and it answers.
  const [existing, inserted] = await d1.batch<Record<string, unknown>>([
    selectKey(d1, request),
    d1
      .prepare(
        `INSERT INTO idempotency_keys (scope, key, request_hash, state, response_status, response_body, locked_until, created_at, expires_at, earlier_runs, owner)
         VALUES (?, ?, ?, 'DONE', ?, ?, ?, ?, ?, 'NONE', ?) ON CONFLICT DO NOTHING RETURNING 1 AS stored`,
      )
      .bind(
        request.scope,
        request.key,
        request.requestHash,
        response.status,
        body,
        request.lockedUntil,
        now.toISOString(),
        new Date(now.getTime() + IDEMPOTENCY_TTL_MS).toISOString(),
        request.owner ?? null,
      ),
  ]);
  if (inserted!.results.length > 0) return new Response(body, { status: response.status, headers: response.headers });
  // Not this refusal's answer after all: the metrics take the code of whatever answers instead.
  c.set("problemCode", undefined);
  const row = existing!.results[0] as unknown as KeyRow | undefined;
  return row && !claimable(row, request, now) ? answerExisting(c, row, request) : null;
}

/** SHA-256 (hex) of what makes two requests "the same": method, path and the raw body. */
export async function requestFingerprint(method: string, path: string, body: string): Promise<string> {
  return sha256Hex(`${method.toUpperCase()}\n${path}\n${body}`);
}

/** Deletes keys past their 24 h life (the minute cron); returns how many went. */
export async function purgeExpiredIdempotencyKeys(env: Env, now: Date): Promise<number> {
  const result = await createDb(env.DB).delete(idempotencyKeys).where(lte(idempotencyKeys.expiresAt, now.toISOString()));
  return result.meta.changes;
}

/**
 * A statement for the handler's own D1 batch that stores its successful response (status 200 and the JSON
 * text `bodySql` evaluates to) in the claim, atomically with the effect. `bodySql` is our SQL, never input.
 */
export function completeClaim(db: D1Database, claim: Claim, bodySql: string, ...bodyParams: unknown[]): D1PreparedStatement {
  return db
    .prepare(
      `UPDATE idempotency_keys SET state = 'DONE', response_status = 200, response_body = (${bodySql})
       WHERE scope = ? AND key = ? AND state = 'IN_PROGRESS' AND locked_until = ? AND ${OWNED_BY} AND (${bodySql}) IS NOT NULL`,
    )
    .bind(...bodyParams, claim.scope, claim.key, claim.lockedUntil, claim.owner ?? null, claim.owner ?? null, ...bodyParams);
}

interface ClaimRequest {
  scope: string;
  key: string;
  requestHash: string;
  /** With `owner`, the claim's owner token: only the request that wrote it may complete or release it. */
  lockedUntil: string;
  /**
   * Random per request: two requests that read the same millisecond share `lockedUntil`, never this. Absent
   * only on a claim made by code from before owners (an older Worker or object during a deploy): matched by
   * its lock alone, as that code matches it (`OWNED_BY`).
   */
  owner?: string | null;
}

/** The owner condition of a claim's statements, bound twice to the claim's owner (or null: the lock alone). */
const OWNED_BY = "(? IS NULL OR owner = ?)";

export interface Claim extends ClaimRequest {
  /**
   * Names the effect of this key's current life: the same for every run of the request (a retry taking
   * over a crashed or slow first run keeps it), new once the key has expired and is used afresh. A
   * handler stores it UNIQUE with its effect, so two runs racing past the lock still apply it once.
   */
  effectRef: string;
  /**
   * Set by a handler whose committed batch carried `completeClaim`: the response is stored with the
   * effect, so the separate write that would store it is skipped (it would match nothing anyway).
   */
  storedWithEffect?: boolean;
  /** True when this claim began the key's life: no run came before it, so nothing of its effect exists yet. */
  fresh?: boolean;
  /**
   * True when an earlier run of this key's life may still commit the same effect (it crashed, or its outcome
   * is unknown): what this run holds may be that run's too, so on a failure it is settled against D1 rather
   * than given back. False after earlier runs that all failed cleanly (released): they left nothing behind.
   */
  shared?: boolean;
}

/**
 * `locked_until` of a released claim: free to take over, and told apart from a crashed one (lock run out).
 * Not the epoch itself, which code before `earlier_runs` wrote when it unlocked a takeover's claim: such a row
 * (or one an old Worker releases during a deploy) reads as crashed, the safe side.
 */
export const RELEASED = new Date(1).toISOString();

/**
 * One atomic statement: insert the claim, or take over a row that is dead, i.e. expired (any
 * fingerprint: the key is free again) or IN_PROGRESS past its lock with the same fingerprint (released
 * by a run that failed, or crashed). An expired key starts a new life (new created_at); a takeover
 * continues the same one (same effect), and records what the runs before it may still do: a crashed one
 * may yet commit (UNKNOWN); released ones cannot, unless one of them had taken over from such a run.
 * Plain SQL, not a query builder: every keyed write runs it.
 */
const CLAIM_SQL = `
  INSERT INTO idempotency_keys (scope, key, request_hash, state, locked_until, created_at, expires_at, earlier_runs, owner)
  VALUES (?1, ?2, ?3, 'IN_PROGRESS', ?4, ?5, ?6, 'NONE', ?7)
  ON CONFLICT (scope, key) DO UPDATE SET
    request_hash = excluded.request_hash,
    state = 'IN_PROGRESS',
    response_status = NULL,
    response_body = NULL,
    locked_until = excluded.locked_until,
    owner = excluded.owner,
    created_at = CASE WHEN idempotency_keys.expires_at <= ?5 THEN ?5 ELSE idempotency_keys.created_at END,
    expires_at = CASE WHEN idempotency_keys.expires_at <= ?5 THEN ?6 ELSE idempotency_keys.expires_at END,
    earlier_runs = CASE
      WHEN idempotency_keys.expires_at <= ?5 THEN 'NONE'
      WHEN idempotency_keys.locked_until = '${RELEASED}' AND idempotency_keys.earlier_runs <> 'UNKNOWN' THEN 'FAILED'
      ELSE 'UNKNOWN' END
  WHERE idempotency_keys.expires_at <= ?5
     OR (idempotency_keys.state = 'IN_PROGRESS' AND idempotency_keys.locked_until <= ?5 AND idempotency_keys.request_hash = ?3)
  RETURNING created_at AS createdAt, earlier_runs AS earlierRuns`;

async function tryClaim(d1: D1Database, claim: ClaimRequest, now: Date): Promise<Claim | null> {
  const at = now.toISOString();
  const expiresAt = new Date(now.getTime() + IDEMPOTENCY_TTL_MS).toISOString();
  const claimed = await d1
    .prepare(CLAIM_SQL)
    .bind(claim.scope, claim.key, claim.requestHash, claim.lockedUntil, at, expiresAt, claim.owner ?? null)
    .first<{ createdAt: string; earlierRuns: KeyRow["earlierRuns"] }>();
  if (claimed === null) return null;
  const effectRef = await effectRefOf(claim.scope, claim.key, claimed.createdAt);
  const { earlierRuns } = claimed;
  // Anything but the two known safe values counts as shared.
  return { ...claim, effectRef, fresh: earlierRuns === "NONE", shared: earlierRuns !== "NONE" && earlierRuns !== "FAILED" };
}

/**
 * Whether an earlier run may share `claim`'s effect (see Claim.shared). A claim from a Worker older than
 * `shared` (a stock object meets those for a while after a deploy) says only whether it is fresh.
 */
export function mayShare(claim: Claim | null): boolean {
  if (claim === null) return false;
  return claim.shared ?? claim.fresh === false;
}

/**
 * One statement, for a handler's first batch, that claims every key of `toMake` that has no row yet (a key
 * with any row, even expired or crashed, is left to `keysInUse` and the usual path). It returns a row per key claimed, with
 * its owner token and fingerprint; `claimsMade` turns them into claims. Two of `toMake` under one key: only
 * the first is claimed.
 */
export function claimNewKeys(db: D1Database, toMake: ClaimToMake[]): D1PreparedStatement {
  const rows = toMake.map((t) => [t.scope, t.key, t.requestHash, t.lockedUntil, t.createdAt, t.expiresAt, t.owner ?? null]);
  return db
    .prepare(
      `INSERT INTO idempotency_keys (scope, key, request_hash, state, locked_until, created_at, expires_at, earlier_runs, owner)
       SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), 'IN_PROGRESS',
         json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), 'NONE', json_extract(value, '$[6]')
       FROM json_each(?) WHERE true
       ON CONFLICT DO NOTHING RETURNING scope, key, request_hash AS requestHash, locked_until AS lockedUntil, owner`,
    )
    .bind(JSON.stringify(rows));
}

/**
 * For the same batch, before `claimNewKeys`: the rows the keys of `toMake` already have (a key with one is
 * not claimed there), so a key in use with a final row is answered from it. `keyRowsOf` maps them by scope
 * and key.
 */
export function keysInUse(db: D1Database, toMake: ClaimToMake[]): D1PreparedStatement {
  return db
    .prepare(
      `${KEY_ROW_SQL} WHERE (scope, key) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))`,
    )
    .bind(JSON.stringify(toMake.map((t) => [t.scope, t.key])));
}

export function keyRowsOf(rows: Record<string, unknown>[]): Map<string, KeyRow> {
  return new Map(rows.map((r) => [keyId(r as unknown as KeyRow), r as unknown as KeyRow]));
}

export const keyId = (k: { scope: string; key: string }) => JSON.stringify([k.scope, k.key]);

/**
 * The claim `claimNewKeys` made for each of `toMake` (in order), from its rows; null where none was. A row
 * is matched by its key, its owner (`owner` and `lockedUntil`) and its fingerprint, so two of `toMake` under one
 * key never both think they hold it.
 */
export async function claimsMade(toMake: ClaimToMake[], rows: Record<string, unknown>[]): Promise<(Claim | null)[]> {
  const id = (r: { scope: unknown; key: unknown; requestHash: unknown; lockedUntil: unknown; owner?: unknown }) =>
    JSON.stringify([r.scope, r.key, r.requestHash, r.lockedUntil, r.owner ?? null]);
  const claimed = new Set(rows.map((r) => id(r as Parameters<typeof id>[0])));
  // Deleted as matched (before any await): one claim per row, even for twins made before owners (no owner).
  return Promise.all(toMake.map((t) => (claimed.delete(id(t)) ? claimOf(t) : null)));
}

/** The claim of `toMake` once its row is written: a fresh one, its key's life beginning at `createdAt`. */
export async function claimOf(toMake: ClaimToMake): Promise<Claim> {
  const { scope, key, requestHash, lockedUntil, owner, createdAt } = toMake;
  return { scope, key, requestHash, lockedUntil, owner, effectRef: await effectRefOf(scope, key, createdAt), fresh: true, shared: false };
}

/** The effect reference of a key's life, the one that began at `createdAt`. */
export function effectRefOf(scope: string, key: string, createdAt: string): Promise<string> {
  return sha256Hex(`${scope}\n${key}\n${createdAt}`);
}

/** Key rows, their columns named as KeyRow names them. */
const KEY_ROW_SQL = `SELECT scope, key, request_hash AS requestHash, state, response_status AS responseStatus,
    response_body AS responseBody, locked_until AS lockedUntil, created_at AS createdAt, expires_at AS expiresAt,
    earlier_runs AS earlierRuns, owner
  FROM idempotency_keys`;

/** The key's row. */
function selectKey(d1: D1Database, claim: ClaimRequest): D1PreparedStatement {
  return d1.prepare(`${KEY_ROW_SQL} WHERE scope = ? AND key = ?`).bind(claim.scope, claim.key);
}

async function readKey(d1: D1Database, claim: ClaimRequest): Promise<KeyRow | undefined> {
  return (await selectKey(d1, claim).first<KeyRow>()) ?? undefined;
}

/**
 * Whether a row read a moment ago still gives the answer a fresh read would: a done result, or another
 * request's fingerprint, neither of which changes while the key lives. A running claim may have finished or
 * been released since (then the usual path reads it again).
 */
function isFinal(row: KeyRow, request: ClaimRequest, now: Date): boolean {
  return !claimable(row, request, now) && (row.state === "DONE" || row.requestHash !== request.requestHash);
}

/** Whether `tryClaim` would take `row` over now (the same condition as CLAIM_SQL's). */
function claimable(row: KeyRow, request: ClaimRequest, now: Date): boolean {
  const at = now.toISOString();
  return row.expiresAt <= at || (row.state === "IN_PROGRESS" && row.lockedUntil <= at && row.requestHash === request.requestHash);
}

function answerExisting(c: Context<AppEnv>, row: KeyRow, claim: ClaimRequest): Response {
  if (row.requestHash !== claim.requestHash) {
    throw new AppError("IDEMPOTENCY_KEY_REUSED", "This idempotency key was already used with another request");
  }
  if (row.state !== "DONE" || row.responseStatus === null || row.responseBody === null) {
    throw new AppError("IDEMPOTENCY_IN_PROGRESS", "A request with this idempotency key is still running");
  }
  // Through the context, so this request's own headers (X-Request-Id) are set as on any response.
  return c.body(row.responseBody, row.responseStatus as ContentfulStatusCode, {
    "Content-Type": storedContentType(row.responseStatus),
    [REPLAYED_HEADER]: "true",
  });
}

// The table keeps no content type: this API answers JSON on success and problem+json on failure.
function storedContentType(status: number): string {
  return status >= 400 ? PROBLEM_CONTENT_TYPE : "application/json";
}

async function runClaimed(
  c: Context<AppEnv>,
  db: Db,
  claim: Claim,
  handler: (claim: Claim) => Promise<Response>,
): Promise<Response> {
  let response: Response;
  try {
    response = await handler(claim);
  } catch (error) {
    return finishClaimedWithError(c, db, claim, error);
  }
  return finishClaimed(c, db, claim, response);
}

/**
 * The handler claimed the key itself (`claimInHandler`). A key that already had a row is answered from it
 * when the row the handler read is final (see `isFinal`), else null (the usual path answers); a refusal before any
 * claim is stored in one write (or answered from the row the key got meanwhile, as in `storeEarlyRefusal`).
 */
async function runClaimingHandler(
  c: Context<AppEnv>,
  db: Db,
  request: ClaimRequest,
  now: Date,
  handler: (toMake: ClaimToMake) => Promise<Response>,
): Promise<Response | null> {
  const toMake: ClaimToMake = {
    ...request,
    createdAt: now.toISOString(),
    expiresAt: new Date(now.getTime() + IDEMPOTENCY_TTL_MS).toISOString(),
    made: null,
  };
  let response: Response;
  try {
    response = await handler(toMake);
  } catch (error) {
    if (toMake.made) return finishClaimedWithError(c, db, toMake.made, error);
    if (error instanceof KeyInUse) return error.row && isFinal(error.row, request, now) ? answerExisting(c, error.row, request) : null;
    if (error instanceof AppError && error.status < 500) return storeEarlyRefusal(c, request, now, error);
    throw error;
  }
  if (!toMake.made) throw new Error("a claiming handler answered without a claim");
  return finishClaimed(c, db, toMake.made, response);
}

async function finishClaimedWithError(c: Context<AppEnv>, db: Db, claim: Claim, error: unknown): Promise<Response> {
  // The effect may have happened: keep the claim, so a retry after the lock takes it over with the
  // same effectRef and finds (or completes) that effect rather than making another.
  if (error instanceof OutcomeUnknownError) throw error;
  if (!(error instanceof AppError) || error.status >= 500) {
    await release(db, claim);
    throw error;
  }
  return finishClaimed(c, db, claim, problemResponse(c, error));
}

/** Stores the handler's response in the claim (unless its batch did), or releases the claim on a 5xx. */
async function finishClaimed(c: Context<AppEnv>, db: Db, claim: Claim, response: Response): Promise<Response> {
  if (response.status >= 500) {
    await release(db, claim);
    return response;
  }
  if (claim.storedWithEffect) return response;
  const body = await response.text();
  await c.env.DB.prepare(
    `UPDATE idempotency_keys SET state = 'DONE', response_status = ?, response_body = ?
     WHERE scope = ? AND key = ? AND state = 'IN_PROGRESS' AND locked_until = ? AND ${OWNED_BY}`,
  )
    .bind(response.status, body, claim.scope, claim.key, claim.lockedUntil, claim.owner ?? null, claim.owner ?? null)
    .run();
  return new Response(body, { status: response.status, headers: response.headers });
}

// Best effort: if D1 is down the claim simply expires at `locked_until`; the original failure matters more.
// Unlocked (RELEASED), never deleted: a retry with the same fingerprint takes it over at once, continuing
// this key's life (same effectRef, so it finds an effect an earlier run may still commit rather than make
// another), and knowing this run left nothing behind. And a key that was claimed keeps a row for its whole
// life: a duplicate refused while this run held units (sold out by its own hold) and storing that refusal
// only after this run gave them back finds the row and takes the usual path, instead of making the refusal
// this key's answer (see `storeEarlyRefusal`).
async function release(db: Db, claim: Claim): Promise<void> {
  try {
    await db.update(idempotencyKeys).set({ lockedUntil: RELEASED }).where(owned(claim));
  } catch (error) {
    log("warn", "could not release an idempotency claim", { scope: claim.scope, ...describeError(error) });
  }
}

function owned(claim: Claim) {
  return and(
    eq(idempotencyKeys.scope, claim.scope),
    eq(idempotencyKeys.key, claim.key),
    eq(idempotencyKeys.state, "IN_PROGRESS"),
    eq(idempotencyKeys.lockedUntil, claim.lockedUntil),
    // A claim made by code from before owners is matched by its lock alone, as that code matches it.
    claim.owner ? eq(idempotencyKeys.owner, claim.owner) : undefined,
  );
}
