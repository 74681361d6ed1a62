import { createExecutionContext, createScheduledController } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { authenticate } from "../../src/lib/auth";
import { createDb } from "../../src/db/client";
import { fixedClock, systemClock, DAY_MS } from "../../src/lib/clock";
import { chargeBalance } from "../../src/wallet/service";
import { AppError, OutcomeUnknownError } from "../../src/lib/errors";
import { effectRefOf, IDEMPOTENCY_LOCK_MS, idempotent, mayShare, purgeExpiredIdempotencyKeys, RELEASED, requestFingerprint, type Claim } from "../../src/lib/idempotency";
import { handleScheduled } from "../../src/scheduled";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { makeUser } from "../helpers/factories";
import { inject } from "../helpers/faults";

const CHARGE = "/api/balance/charge";

const chargeWithKey = (token: string, key: string, body: unknown, extra: Record<string, string> = {}) =>
  call("POST", CHARGE, { token, body, headers: { "Idempotency-Key": key, ...extra } });

const newKey = () => `key-${crypto.randomUUID()}`;

async function ledgerCount(userId: number): Promise<number> {
  const row = await env.DB.prepare("SELECT COUNT(*) AS n FROM wallet_transactions WHERE user_id = ?")
    .bind(userId)
    .first<{ n: number }>();
  return row!.n;
}

async function keyRow(scope: string, key: string) {
  return env.DB.prepare("SELECT * FROM idempotency_keys WHERE scope = ? AND key = ?").bind(scope, key).first();
}

const LONG_AGO = "2020-01-01T00:00:00.000Z";
const FAR_AHEAD = "2999-01-01T00:00:00.000Z";

interface SeededKey {
  scope: string;
  key: string;
  hash: string;
  state?: "IN_PROGRESS" | "DONE";
  lockedUntil?: string;
  expiresAt?: string;
}

/** Puts a key row straight into D1 (by default a claim that crashed long ago), as a request would have left it. */
async function seedKey(row: SeededKey) {
  const { scope, key, hash, state = "IN_PROGRESS", lockedUntil = LONG_AGO, expiresAt = FAR_AHEAD } = row;
  await env.DB.prepare(
    `INSERT INTO idempotency_keys (scope, key, request_hash, state, locked_until, created_at, expires_at)
     VALUES (?, ?, ?, ?, ?, ?, ?)`,
  )
    .bind(scope, key, hash, state, lockedUntil, LONG_AGO, expiresAt)
    .run();
}

const chargeHash = (body: unknown) => requestFingerprint("POST", CHARGE, JSON.stringify(body));

describe("replay", () => {
  it("the same key and body replays the first response byte for byte and charges once", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const key = newKey();
    const first = await chargeWithKey(token, key, { amount: 5_000 });
    expect(first.status).toBe(200);
    expect(first.headers.get("idempotent-replayed")).toBeNull();
    expect(first.headers.get("x-request-id")).toBeTruthy();

    const again = await chargeWithKey(token, key, { amount: 5_000 }, { "X-Request-Id": "second-try" });
    expect(again.status).toBe(200);
    expect(again.headers.get("idempotent-replayed")).toBe("true");
    expect(again.text).toBe(first.text);
    expect(again.headers.get("content-type")).toBe(first.headers.get("content-type"));
    expect(again.headers.get("x-request-id")).toBe("second-try");
    expect(again.headers.get("x-content-type-options")).toBe("nosniff");
    expect(await ledgerCount(user.id)).toBe(1);
    expect((await call("GET", `/api/balance/${user.id}`, { token })).body.balance).toBe(5_000);
  });

  it("a 4xx business failure is stored and replayed too, request id and all", async () => {
    const key = newKey();
    const admin = await adminToken();
    const body = { userId: 987654321, amount: 100 };
    const first = await chargeWithKey(admin, key, body, { "X-Request-Id": "first-try" });
    expectProblem(first, 404, "USER_NOT_FOUND");
    const again = await chargeWithKey(admin, key, body, { "X-Request-Id": "second-try" });
    expectProblem(again, 404, "USER_NOT_FOUND");
    expect(again.headers.get("idempotent-replayed")).toBe("true");
    expect(again.text).toBe(first.text);
    expect(again.body.requestId).toBe("first-try");
    expect(again.headers.get("content-type")).toBe(first.headers.get("content-type"));
  });

  it("without the header every request runs", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    await call("POST", CHARGE, { token, body: { amount: 10 } });
    await call("POST", CHARGE, { token, body: { amount: 10 } });
    expect(await ledgerCount(user.id)).toBe(2);
  });

  it("keys are scoped per caller: two users (and an admin) may use the same key", async () => {
    const [a, b] = [await makeUser(), await makeUser()];
    const key = newKey();
    const resA = await chargeWithKey(await tokenFor(a.id), key, { amount: 100 });
    const resB = await chargeWithKey(await tokenFor(b.id), key, { amount: 100 });
    const resAdmin = await chargeWithKey(await adminToken(), key, { userId: a.id, amount: 100 });
    for (const res of [resA, resB, resAdmin]) {
      expect(res.status).toBe(200);
      expect(res.headers.get("idempotent-replayed")).toBeNull();
    }
    expect([await ledgerCount(a.id), await ledgerCount(b.id)]).toEqual([2, 1]);
  });

  it("a key lives 24 hours: replayed just before, run afresh after", async () => {
    const clock = fixedClock("2026-11-23T08:00:00.000Z");
    const app = createApp({ clock });
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const key = newKey();
    const send = () => call("POST", CHARGE, { app, token, body: { amount: 700 }, headers: { "Idempotency-Key": key } });

    expect((await send()).headers.get("idempotent-replayed")).toBeNull();
    clock.advance(DAY_MS - 1);
    expect((await send()).headers.get("idempotent-replayed")).toBe("true");
    clock.advance(1);
    const fresh = await send();
    expect(fresh.status).toBe(200);
    expect(fresh.headers.get("idempotent-replayed")).toBeNull();
    expect(await ledgerCount(user.id)).toBe(2);
  });
});

describe("misuse", () => {
  it("422 IDEMPOTENCY_KEY_REUSED for the same key with another body; nothing is charged again", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const key = newKey();
    expect((await chargeWithKey(token, key, { amount: 100 })).status).toBe(200);
    expectProblem(await chargeWithKey(token, key, { amount: 200 }), 422, "IDEMPOTENCY_KEY_REUSED");
    expectProblem(await chargeWithKey(token, key, { userId: user.id, amount: 100 }), 422, "IDEMPOTENCY_KEY_REUSED");
    expect(await ledgerCount(user.id)).toBe(1);
  });

  it("400 VALIDATION_FAILED for a key that is empty, too long or not printable ASCII", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    for (const key of ["", "x".repeat(256), "del\x7f", "a\tb"]) {
      expectProblem(await chargeWithKey(token, key, { amount: 100 }), 400, "VALIDATION_FAILED");
    }
    expect((await chargeWithKey(token, "~".repeat(255), { amount: 100 })).status).toBe(200);
    expect(await ledgerCount(user.id)).toBe(1);
  });

  it("refuses a bad key before anything else the route checks, on every write that takes one", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const badKey = { "Idempotency-Key": "a\tb" };
    for (const [path, body] of [
      [CHARGE, "not json"],
      ["/api/orders", { items: [] }],
      ["/api/orders/1/cancel", { reason: 5 }],
    ] as const) {
      // A bad body, sent as JSON or as another type: the key's problem is the one reported (not 415, not the body).
      for (const headers of [badKey, { ...badKey, "Content-Type": "text/plain" }]) {
        const res = await call("POST", path, { token, headers, body });
        expectProblem(res, 400, "VALIDATION_FAILED");
        expect(res.body.errors, `${path} ${JSON.stringify(headers)}`).toEqual([{ path: "idempotency-key", message: "1..255 printable ASCII characters" }]);
      }
    }
    const tooLong = await call("POST", "/api/orders", { token, headers: { "Idempotency-Key": "x".repeat(256) }, body: { items: [] } });
    expect(tooLong.body.errors).toEqual([{ path: "idempotency-key", message: expect.stringContaining("255") }]);
    expect(await ledgerCount(user.id)).toBe(0);
  });

  it("409 IDEMPOTENCY_IN_PROGRESS while the first request still runs (422 if the body differs)", async () => {
    const user = await makeUser();
    const key = newKey();
    const body = { amount: 300 };
    const lockedUntil = new Date(Date.now() + 60_000).toISOString();
    await seedKey({ scope: `user:${user.id}`, key, hash: await chargeHash(body), state: "IN_PROGRESS", lockedUntil });
    const token = await tokenFor(user.id);
    expectProblem(await chargeWithKey(token, key, body), 409, "IDEMPOTENCY_IN_PROGRESS");
    expectProblem(await chargeWithKey(token, key, { amount: 301 }), 422, "IDEMPOTENCY_KEY_REUSED");
    expect(await ledgerCount(user.id)).toBe(0);
  });
});

describe("concurrency and failure", () => {
  it("20 parallel requests with one key charge exactly once; the others replay or get 409", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const key = newKey();
    const results = await Promise.all(Array.from({ length: 20 }, () => chargeWithKey(token, key, { amount: 1_234 })));
    const ran = results.filter((r) => r.status === 200 && r.headers.get("idempotent-replayed") === null);
    const replayed = results.filter((r) => r.headers.get("idempotent-replayed") === "true");
    const busy = results.filter((r) => r.status === 409);
    expect(ran).toHaveLength(1);
    expect(ran.length + replayed.length + busy.length).toBe(20);
    for (const r of replayed) expect(r.text).toBe(ran[0]!.text);
    for (const r of busy) expectProblem(r, 409, "IDEMPOTENCY_IN_PROGRESS");
    expect(await ledgerCount(user.id)).toBe(1);
    const row = await env.DB.prepare("SELECT balance FROM users WHERE id = ?").bind(user.id).first();
    expect(row).toEqual({ balance: 1_234 });
    expect(await keyRow(`user:${user.id}`, key)).toMatchObject({ state: "DONE", response_status: 200 });
  });

  it("a crashed claim (IN_PROGRESS past its lock) is taken over by a retry with the same body", async () => {
    const user = await makeUser();
    const key = newKey();
    const body = { amount: 900 };
    const scope = `user:${user.id}`;
    await seedKey({ scope, key, hash: await chargeHash(body) });
    const token = await tokenFor(user.id);
    const res = await chargeWithKey(token, key, body);
    expect(res.status).toBe(200);
    expect(res.headers.get("idempotent-replayed")).toBeNull();
    expect(await ledgerCount(user.id)).toBe(1);
    expect(await keyRow(scope, key)).toMatchObject({ state: "DONE", response_status: 200, response_body: res.text });
    expect((await chargeWithKey(token, key, body)).headers.get("idempotent-replayed")).toBe("true");
  });

  it("a charge that committed before its Worker died is replayed on retry, not applied twice", async () => {
    const user = await makeUser();
    const key = newKey();
    const body = { amount: 700 };
    const scope = `user:${user.id}`;
    const claim = { scope, key, requestHash: await chargeHash(body), lockedUntil: LONG_AGO, effectRef: await effectRefOf(scope, key, LONG_AGO) };
    await seedKey({ scope, key, hash: claim.requestHash });
    // The first attempt gets as far as its batch, then dies: nothing after the batch runs.
    const committed = await chargeBalance(env.DB, systemClock, user.id, 700, claim);
    const retry = await chargeWithKey(await tokenFor(user.id), key, body);
    expect(retry.status).toBe(200);
    expect(retry.text).toBe(committed);
    expect(retry.headers.get("idempotent-replayed")).toBe("true");
    expect(await ledgerCount(user.id)).toBe(1);
  });

  it("during a deploy, a claim from code before owners completes its row by its lock alone, and one with an owner only its own", async () => {
    const user = await makeUser();
    const body = { amount: 300 };
    const scope = `user:${user.id}`;
    const requestHash = await chargeHash(body);
    // An older Worker took over a row a newer one had claimed: the lock is the older Worker's, the owner is not.
    const olderKey = newKey();
    await seedKey({ scope, key: olderKey, hash: requestHash, lockedUntil: FAR_AHEAD });
    await env.DB.prepare("UPDATE idempotency_keys SET owner = 'the-newer-worker' WHERE scope = ? AND key = ?").bind(scope, olderKey).run();
    const olderClaim = { scope, key: olderKey, requestHash, lockedUntil: FAR_AHEAD, effectRef: await effectRefOf(scope, olderKey, LONG_AGO) };
    await chargeBalance(env.DB, systemClock, user.id, 300, olderClaim);
    expect(await keyRow(scope, olderKey)).toMatchObject({ state: "DONE", response_status: 200 });
    // A claim with an owner completes nothing held by another owner, even at the same lock time.
    const otherKey = newKey();
    await seedKey({ scope, key: otherKey, hash: requestHash, lockedUntil: FAR_AHEAD });
    await env.DB.prepare("UPDATE idempotency_keys SET owner = 'the-holder' WHERE scope = ? AND key = ?").bind(scope, otherKey).run();
    const stranger = { scope, key: otherKey, requestHash, lockedUntil: FAR_AHEAD, owner: "a-stranger", effectRef: await effectRefOf(scope, otherKey, LONG_AGO) };
    await chargeBalance(env.DB, systemClock, user.id, 300, stranger);
    expect(await keyRow(scope, otherKey)).toMatchObject({ state: "IN_PROGRESS", response_status: null });
  });

  it("a slow first run that commits after a retry took over charges once", async () => {
    const user = await makeUser();
    const key = newKey();
    const body = { amount: 800 };
    const scope = `user:${user.id}`;
    const claim = { scope, key, requestHash: await chargeHash(body), lockedUntil: LONG_AGO, effectRef: await effectRefOf(scope, key, LONG_AGO) };
    await seedKey({ scope, key, hash: claim.requestHash });
    const retry = await chargeWithKey(await tokenFor(user.id), key, body);
    expect(retry.status).toBe(200);
    const late = await chargeBalance(env.DB, systemClock, user.id, 800, claim);
    expect(late).toBe(retry.text);
    expect(await ledgerCount(user.id)).toBe(1);
    const balance = await env.DB.prepare("SELECT balance FROM users WHERE id = ?").bind(user.id).first<{ balance: number }>();
    expect(balance!.balance).toBe(800);
  });

  it("a claim its failing owner unlocks between a retry's two reads is taken over, not answered 409", async () => {
    const user = await makeUser();
    const key = newKey();
    const body = { amount: 600 };
    const scope = `user:${user.id}`;
    // The first run still holds the key when the retry tries to claim it...
    await seedKey({ scope, key, hash: await chargeHash(body), lockedUntil: FAR_AHEAD });
    const unlock = () => env.DB.prepare("UPDATE idempotency_keys SET locked_until = ? WHERE scope = ? AND key = ?").bind(RELEASED, scope, key).run();
    let unlocked = false;
    // ...and fails (unlocking its claim) just after the retry's claim missed, before the retry reads the key.
    const restore = inject(env.DB, "prepare", (prepare) =>
      ((sql: string) => {
        const statement = prepare(sql);
        if (unlocked || !sql.includes("ON CONFLICT (scope, key) DO UPDATE")) return statement;
        return {
          bind: (...values: unknown[]) => {
            const bound = statement.bind(...values);
            return {
              first: async () => {
                const missed = await bound.first();
                unlocked = true;
                await unlock();
                return missed;
              },
            };
          },
        };
      }) as typeof prepare,
    );
    let retry;
    try {
      retry = await chargeWithKey(await tokenFor(user.id), key, body);
    } finally {
      restore();
    }
    expect(unlocked).toBe(true);
    expect(retry.status).toBe(200);
    expect(await ledgerCount(user.id)).toBe(1);
    expect(await keyRow(scope, key)).toMatchObject({ state: "DONE", response_status: 200, response_body: retry.text });
  });

  it("a crashed claim is not taken over by a request with another body", async () => {
    const user = await makeUser();
    const key = newKey();
    const scope = `user:${user.id}`;
    await seedKey({ scope, key, hash: await chargeHash({ amount: 1 }) });
    expectProblem(await chargeWithKey(await tokenFor(user.id), key, { amount: 2 }), 422, "IDEMPOTENCY_KEY_REUSED");
    expect(await ledgerCount(user.id)).toBe(0);
  });

  it("a write whose outcome is unknown answers 503 and keeps the claim for a retry to continue", async () => {
    const app = createApp();
    app.post("/test/lost-reply", authenticate, (c) =>
      idempotent(c, async () => {
        throw new OutcomeUnknownError("The write may or may not have happened");
      }),
    );
    const user = await makeUser();
    const key = newKey();
    const res = await call("POST", "/test/lost-reply", { app, token: await tokenFor(user.id), body: {}, headers: { "Idempotency-Key": key } });
    expectProblem(res, 503, "SERVICE_UNAVAILABLE");
    expect(await keyRow(`user:${user.id}`, key)).toMatchObject({ state: "IN_PROGRESS" });
  });

  it("an unexpected failure (5xx) unlocks the claim: the retry runs at once, another body is still 422", async () => {
    let failures = 2;
    let runs = 0;
    const app = createApp();
    app.post("/test/flaky", authenticate, (c) =>
      idempotent(c, async () => {
        runs++;
        if (failures === 2) {
          failures--;
          throw new Error("D1 went away");
        }
        if (failures === 1) {
          failures--;
          throw new AppError("SERVICE_UNAVAILABLE", "try later");
        }
        return c.json({ ok: true }, 200);
      }),
    );
    const user = await makeUser();
    const key = newKey();
    const token = await tokenFor(user.id);
    const send = (body: unknown = { x: 1 }) => call("POST", "/test/flaky", { app, token, body, headers: { "Idempotency-Key": key } });
    const unlocked = { state: "IN_PROGRESS", locked_until: RELEASED, response_status: null };

    expectProblem(await send(), 500, "INTERNAL");
    expect(await keyRow(`user:${user.id}`, key)).toMatchObject(unlocked);
    expectProblem(await send({ x: 2 }), 422, "IDEMPOTENCY_KEY_REUSED");
    expectProblem(await send(), 503, "SERVICE_UNAVAILABLE");
    expect(await keyRow(`user:${user.id}`, key)).toMatchObject(unlocked);
    expect((await send()).status).toBe(200);
    expect((await send()).headers.get("idempotent-replayed")).toBe("true");
    expect(runs).toBe(3);
  });

  it("a takeover knows what the runs before it may still do, from the row, even within the same millisecond", async () => {
    // Every request reads the same instant, as concurrent requests of one isolate can on Workers.
    const clock = fixedClock("2026-12-02T03:00:00.000Z");
    const app = createApp({ clock });
    const seen: Claim[] = [];
    const script: ("fail" | "unknown" | "ok")[] = [];
    app.post("/test/runs", authenticate, (c) =>
      idempotent(c, async (claim) => {
        seen.push({ ...claim! });
        const next = script.shift();
        if (next === "fail") throw new Error("D1 went away");
        if (next === "unknown") throw new OutcomeUnknownError("the write may have committed");
        return c.json({ ok: true }, 200);
      }),
    );
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const send = (key: string) => call("POST", "/test/runs", { app, token, body: { x: 1 }, headers: { "Idempotency-Key": key } });
    const runsOf = async (key: string, steps: ("fail" | "unknown" | "ok" | "lock runs out")[]) => {
      seen.length = 0;
      for (const step of steps) {
        if (step === "lock runs out") {
          clock.advance(IDEMPOTENCY_LOCK_MS + 1);
          continue;
        }
        script.push(step);
        await send(key);
      }
      expect(new Set(seen.map((c) => c.effectRef)).size).toBe(1);
      return seen.map(({ fresh, shared }) => ({ fresh, shared }));
    };
    const first = { fresh: true, shared: false };
    const afterCleanFailures = { fresh: false, shared: false };
    const afterACrash = { fresh: false, shared: true };

    // Released twice, in the same millisecond as the claim: nothing of the failed runs can still commit.
    expect(await runsOf(newKey(), ["fail", "fail", "ok"])).toEqual([first, afterCleanFailures, afterCleanFailures]);
    // A run whose outcome is unknown keeps its claim: once its lock runs out, the takeover may share its effect.
    expect(await runsOf(newKey(), ["unknown", "lock runs out", "ok"])).toEqual([first, afterACrash]);
    // Once shared, always shared in this life, even after a later run fails cleanly.
    expect(await runsOf(newKey(), ["fail", "unknown", "lock runs out", "fail", "ok"])).toEqual([
      first,
      afterCleanFailures,
      afterACrash,
      afterACrash,
    ]);

    // Deploys: a row an older Worker unlocked (with the epoch, which it wrote only for a takeover's claim, and
    // without touching earlier_runs) reads as crashed; an older Worker's claim, without `shared`, says it by `fresh`.
    const legacy = newKey();
    await env.DB.prepare(
      `INSERT INTO idempotency_keys (scope, key, request_hash, state, locked_until, created_at, expires_at, earlier_runs)
       VALUES (?, ?, ?, 'IN_PROGRESS', ?, ?, ?, 'NONE')`,
    )
      .bind(`user:${user.id}`, legacy, await requestFingerprint("POST", "/test/runs", JSON.stringify({ x: 1 })), new Date(0).toISOString(), LONG_AGO, FAR_AHEAD)
      .run();
    expect(await runsOf(legacy, ["ok"])).toEqual([afterACrash]);
    const { shared: _, ...olderWorkers } = seen[0]!;
    expect([mayShare({ ...olderWorkers, fresh: false }), mayShare({ ...olderWorkers, fresh: true })]).toEqual([true, false]);
  });

  it("a refusal a duplicate owes to a run that then fails is not stored: the key's retry still runs", async () => {
    // The race: run 1 holds the last unit; its duplicate is refused for it (by the object, or the isolate's
    // sold-out mark); run 1 fails with a 5xx and gives the unit back; only then does the duplicate store its
    // refusal under the key. Run 1's claim is still there (unlocked), so the duplicate takes the key over.
    let soldOutByRunOne = false;
    let runs = 0;
    const app = createApp();
    app.post("/test/drop", authenticate, (c) =>
      idempotent(
        c,
        async () => {
          runs++;
          if (runs === 1) {
            soldOutByRunOne = true;
            throw new Error("D1 went away after the hold");
          }
          return c.json({ placed: true }, 200);
        },
        { refuseEarly: () => (soldOutByRunOne ? new AppError("OUT_OF_STOCK", "sold out (by run 1's own hold)") : null) },
      ),
    );
    const user = await makeUser();
    const key = newKey();
    const token = await tokenFor(user.id);
    const send = () => call("POST", "/test/drop", { app, token, body: { productId: 1 }, headers: { "Idempotency-Key": key } });

    expectProblem(await send(), 500, "INTERNAL");
    const duplicate = await send();
    expect(duplicate.status).toBe(200);
    expect(duplicate.body).toEqual({ placed: true });
    expect(await keyRow(`user:${user.id}`, key)).toMatchObject({ state: "DONE", response_status: 200 });
    expect(runs).toBe(2);
  });
});

describe("purge", () => {
  it("deletes keys past their expiry and keeps the rest", async () => {
    const scope = `user:purge-${crypto.randomUUID()}`;
    const now = new Date("2030-01-02T00:00:00.000Z");
    const rows = [
      { key: "expired", expiresAt: "2030-01-01T23:59:59.999Z" },
      { key: "expires-now", expiresAt: "2030-01-02T00:00:00.000Z" },
      { key: "alive", expiresAt: "2030-01-02T00:00:00.001Z" },
    ];
    for (const { key, expiresAt } of rows) await seedKey({ scope, key, hash: "h", state: "DONE", expiresAt });

    expect(await purgeExpiredIdempotencyKeys(env, now)).toBeGreaterThanOrEqual(2);
    const left = await env.DB.prepare("SELECT key FROM idempotency_keys WHERE scope = ?").bind(scope).all();
    expect(left.results).toEqual([{ key: "alive" }]);
  });

  it("runs from the minute cron", async () => {
    const scope = `user:cron-${crypto.randomUUID()}`;
    await seedKey({ scope, key: "old", hash: "h", state: "DONE", expiresAt: "2020-01-02T00:00:00.000Z" });
    const controller = createScheduledController({ scheduledTime: new Date(), cron: "* * * * *" });
    await handleScheduled(controller, env, createExecutionContext());
    expect(await keyRow(scope, "old")).toBeNull();
  });
});
