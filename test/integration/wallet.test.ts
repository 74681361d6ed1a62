import { env } from "cloudflare:workers";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { fixedClock } from "../../src/lib/clock";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { chargeUser, makeUser } from "../helpers/factories";

const LIMIT = 10_000_000;
const TIMESTAMP = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

/** What D1 holds for a user: balance, ledger sum and count, newest balance_after. */
async function walletInDb(userId: number) {
  const user = await env.DB.prepare("SELECT balance FROM users WHERE id = ?").bind(userId).first<{ balance: number }>();
  const ledger = await env.DB.prepare(
    "SELECT COALESCE(SUM(amount), 0) AS total, COUNT(*) AS count FROM wallet_transactions WHERE user_id = ?",
  )
    .bind(userId)
    .first<{ total: number; count: number }>();
  const newest = await env.DB.prepare(
    "SELECT balance_after FROM wallet_transactions WHERE user_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
  )
    .bind(userId)
    .first<{ balance_after: number }>();
  return {
    balance: user!.balance,
    total: ledger!.total,
    count: ledger!.count,
    newestAfter: newest?.balance_after ?? 0,
  };
}

async function expectLedgerConsistent(userId: number): Promise<number> {
  const w = await walletInDb(userId);
  expect(w.total).toBe(w.balance);
  expect(w.newestAfter).toBe(w.balance);
  expect(w.balance).toBeLessThanOrEqual(LIMIT);
  return w.balance;
}

const charge = (token: string, body: unknown) => call("POST", "/api/balance/charge", { token, body });

describe("GET /api/balance/{userId}", () => {
  it("a user reads their own balance", async () => {
    const user = await makeUser();
    const res = await call("GET", `/api/balance/${user.id}`, { token: await tokenFor(user.id) });
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ userId: user.id, balance: 0, updatedAt: expect.stringMatching(TIMESTAMP) });
  });

  it("reflects charges, and an admin may read anyone's", async () => {
    const user = await makeUser();
    await chargeUser(user.id, 7_000);
    const res = await call("GET", `/api/balance/${user.id}`, { token: await adminToken() });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ userId: user.id, balance: 7_000 });
  });

  it("403 for another user's balance, even one that does not exist", async () => {
    const [me, other] = [await makeUser(), await makeUser()];
    const token = await tokenFor(me.id);
    expectProblem(await call("GET", `/api/balance/${other.id}`, { token }), 403, "FORBIDDEN");
    expectProblem(await call("GET", "/api/balance/987654321", { token }), 403, "FORBIDDEN");
  });

  it("404 USER_NOT_FOUND for an unknown user", async () => {
    const res = await call("GET", "/api/balance/987654321", { token: await adminToken() });
    expectProblem(res, 404, "USER_NOT_FOUND");
    const ghost = await call("GET", "/api/balance/987654322", { token: await tokenFor(987654322) });
    expectProblem(ghost, 404, "USER_NOT_FOUND");
  });

  it("401 without a token, 400 for a non-numeric id", async () => {
    expectProblem(await call("GET", "/api/balance/1"), 401, "UNAUTHENTICATED");
    expectProblem(await call("GET", "/api/balance/abc", { token: await adminToken() }), 400, "VALIDATION_FAILED");
  });
});

describe("POST /api/balance/charge", () => {
  it("a user charges their own wallet without naming it", async () => {
    const user = await makeUser();
    const res = await charge(await tokenFor(user.id), { amount: 15_000 });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("application/json");
    expect(res.body).toEqual({
      userId: user.id,
      balance: 15_000,
      transaction: {
        id: expect.any(Number),
        type: "CHARGE",
        amount: 15_000,
        balanceAfter: 15_000,
        orderId: null,
        createdAt: expect.stringMatching(TIMESTAMP),
      },
    });
    await expectLedgerConsistent(user.id);
  });

  it("a user may name their own id; an admin charges anyone by naming them", async () => {
    const user = await makeUser();
    const own = await charge(await tokenFor(user.id), { userId: user.id, amount: 1_000 });
    expect(own.status).toBe(200);
    const byAdmin = await charge(await adminToken(), { userId: user.id, amount: 2_000 });
    expect(byAdmin.status).toBe(200);
    expect(byAdmin.body).toMatchObject({ userId: user.id, balance: 3_000, transaction: { balanceAfter: 3_000 } });
    expect(await expectLedgerConsistent(user.id)).toBe(3_000);
  });

  it("accepts the amount bounds 1 and 1,000,000", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    expect((await charge(token, { amount: 1 })).status).toBe(200);
    expect((await charge(token, { amount: 1_000_000 })).status).toBe(200);
    expect(await expectLedgerConsistent(user.id)).toBe(1_000_001);
  });

  it("400 VALIDATION_FAILED for an amount that is not an integer in 1..1,000,000, and nothing changes", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    for (const amount of [0, -1, 1.5, 1_000_001, "100", null]) {
      const res = await charge(token, { amount });
      expectProblem(res, 400, "VALIDATION_FAILED");
      expect(res.body.errors.map((e: { path: string }) => e.path)).toContain("amount");
    }
    expectProblem(await charge(token, {}), 400, "VALIDATION_FAILED");
    expectProblem(await charge(token, { amount: 10, note: "x" }), 400, "VALIDATION_FAILED");
    expectProblem(await charge(token, { userId: "1", amount: 10 }), 400, "VALIDATION_FAILED");
    expect(await walletInDb(user.id)).toMatchObject({ balance: 0, count: 0 });
  });

  it("415 for a request with no body and no Content-Type", async () => {
    const user = await makeUser();
    expectProblem(await call("POST", "/api/balance/charge", { token: await tokenFor(user.id) }), 415, "UNSUPPORTED_MEDIA_TYPE");
    expect(await walletInDb(user.id)).toMatchObject({ balance: 0, count: 0 });
  });

  it("400 BALANCE_LIMIT_EXCEEDED past 10,000,000; exactly the limit is fine; a refusal writes nothing", async () => {
    const user = await makeUser();
    for (let i = 0; i < 9; i++) await chargeUser(user.id, 1_000_000);
    await chargeUser(user.id, 999_999);
    const token = await tokenFor(user.id);
    expectProblem(await charge(token, { amount: 2 }), 400, "BALANCE_LIMIT_EXCEEDED");
    expect((await charge(token, { amount: 1 })).body).toMatchObject({ balance: LIMIT });
    expectProblem(await charge(token, { amount: 1 }), 400, "BALANCE_LIMIT_EXCEEDED");
    expect(await walletInDb(user.id)).toEqual({ balance: LIMIT, total: LIMIT, count: 11, newestAfter: LIMIT });
  });

  it("404 USER_NOT_FOUND when an admin charges an unknown user; no ledger row appears", async () => {
    const res = await charge(await adminToken(), { userId: 987654321, amount: 100 });
    expectProblem(res, 404, "USER_NOT_FOUND");
    const rows = await env.DB.prepare("SELECT COUNT(*) AS n FROM wallet_transactions WHERE user_id = ?")
      .bind(987654321)
      .first<{ n: number }>();
    expect(rows!.n).toBe(0);
  });

  it("403 when a user charges someone else; 400 when an admin names nobody; 401 without a token", async () => {
    const [me, other] = [await makeUser(), await makeUser()];
    expectProblem(await charge(await tokenFor(me.id), { userId: other.id, amount: 100 }), 403, "FORBIDDEN");
    expectProblem(await charge(await adminToken(), { amount: 100 }), 400, "VALIDATION_FAILED");
    expectProblem(await call("POST", "/api/balance/charge", { body: { amount: 100 } }), 401, "UNAUTHENTICATED");
    expect(await walletInDb(other.id)).toMatchObject({ balance: 0, count: 0 });
  });

  it("50 parallel charges to one user all land, each with the right balanceAfter", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const results = await Promise.all(Array.from({ length: 50 }, () => charge(token, { amount: 1_000 })));
    expect(results.map((r) => r.status)).toEqual(Array(50).fill(200));
    expect(await walletInDb(user.id)).toEqual({ balance: 50_000, total: 50_000, count: 50, newestAfter: 50_000 });
    const afters = await env.DB.prepare(
      "SELECT balance_after FROM wallet_transactions WHERE user_id = ? ORDER BY created_at, id",
    )
      .bind(user.id)
      .all<{ balance_after: number }>();
    expect(afters.results.map((r) => r.balance_after)).toEqual(Array.from({ length: 50 }, (_, i) => (i + 1) * 1_000));
  });

  it("parallel charges near the limit: exactly those that fit land, the rest are refused", async () => {
    const user = await makeUser();
    for (let i = 0; i < 9; i++) await chargeUser(user.id, 1_000_000);
    await chargeUser(user.id, 500_000);
    const token = await tokenFor(user.id);
    const results = await Promise.all(Array.from({ length: 12 }, () => charge(token, { amount: 100_000 })));
    expect(results.filter((r) => r.status === 200)).toHaveLength(5);
    for (const r of results.filter((r) => r.status !== 200)) expectProblem(r, 400, "BALANCE_LIMIT_EXCEEDED");
    expect(await expectLedgerConsistent(user.id)).toBe(LIMIT);
  });
});

describe("GET /api/users/balance/history", () => {
  const history = (token: string, query = "") => call("GET", `/api/users/balance/history${query}`, { token });

  it("lists the caller's own transactions, newest first", async () => {
    const [me, other] = [await makeUser(), await makeUser()];
    await chargeUser(me.id, 100);
    await chargeUser(other.id, 999);
    await chargeUser(me.id, 200);
    const res = await history(await tokenFor(me.id));
    expect(res.status).toBe(200);
    expect(res.body.nextCursor).toBeNull();
    expect(res.body.items).toEqual([
      expect.objectContaining({ type: "CHARGE", amount: 200, balanceAfter: 300, orderId: null }),
      expect.objectContaining({ type: "CHARGE", amount: 100, balanceAfter: 100, orderId: null }),
    ]);
  });

  it("breaks ties on createdAt by id, descending", async () => {
    const app = createApp({ clock: fixedClock("2026-11-23T08:00:00.000Z") });
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const ids: number[] = [];
    for (const amount of [1, 2, 3]) {
      const res = await call("POST", "/api/balance/charge", { app, token, body: { amount } });
      ids.push(res.body.transaction.id);
    }
    const res = await history(token);
    expect(res.body.items.map((t: { id: number }) => t.id)).toEqual(ids.reverse());
    const times = res.body.items.map((t: { createdAt: string }) => t.createdAt);
    expect(times).toEqual(Array(3).fill("2026-11-23T08:00:00.000Z"));
  });

  it("a charge that read an earlier clock but committed later still sorts as the newest", async () => {
    const late = createApp({ clock: fixedClock("2026-11-23T08:00:01.000Z") });
    const early = createApp({ clock: fixedClock("2026-11-23T08:00:00.000Z") });
    const user = await makeUser();
    const token = await tokenFor(user.id);
    await call("POST", "/api/balance/charge", { app: late, token, body: { amount: 100 } });
    const second = await call("POST", "/api/balance/charge", { app: early, token, body: { amount: 50 } });
    expect(second.body.transaction).toMatchObject({ balanceAfter: 150, createdAt: "2026-11-23T08:00:01.000Z" });
    const res = await history(token);
    expect(res.body.items.map((t: { balanceAfter: number }) => t.balanceAfter)).toEqual([150, 100]);
    await expectLedgerConsistent(user.id);
  });

  it("pages never skip or repeat rows while new charges arrive between pages", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const before: number[] = [];
    for (let i = 1; i <= 7; i++) before.unshift((await chargeUser(user.id, i)).transaction.id);
    const seen: number[] = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const query: string = cursor ? `?limit=3&cursor=${cursor}` : "?limit=3";
      const res: Awaited<ReturnType<typeof history>> = await history(token, query);
      expect(res.status).toBe(200);
      seen.push(...res.body.items.map((t: { id: number }) => t.id));
      cursor = res.body.nextCursor;
      pages++;
      await chargeUser(user.id, 1_000 + pages);
    } while (cursor);
    expect(seen).toEqual(before);
    expect(pages).toBe(3);
    await expectLedgerConsistent(user.id);
  });

  it("an admin must name the user; a user may name only themselves", async () => {
    const [me, other] = [await makeUser(), await makeUser()];
    await chargeUser(other.id, 500);
    const admin = await adminToken();
    expectProblem(await history(admin), 400, "VALIDATION_FAILED");
    const named = await history(admin, `?userId=${other.id}`);
    expect(named.status).toBe(200);
    expect(named.body.items).toEqual([expect.objectContaining({ amount: 500, balanceAfter: 500 })]);
    expect((await history(await tokenFor(me.id), `?userId=${me.id}`)).status).toBe(200);
    expectProblem(await history(await tokenFor(me.id), `?userId=${other.id}`), 403, "FORBIDDEN");
  });

  it("404 for an unknown user, 401 without a token, 400 for a bad limit or cursor", async () => {
    const admin = await adminToken();
    expectProblem(await history(admin, "?userId=987654321"), 404, "USER_NOT_FOUND");
    expectProblem(await call("GET", "/api/users/balance/history"), 401, "UNAUTHENTICATED");
    const token = await tokenFor((await makeUser()).id);
    for (const query of ["?limit=0", "?limit=101", "?limit=x", "?cursor=!!!", `?cursor=${btoa("[1,2]")}`]) {
      expectProblem(await history(token, query), 400, "VALIDATION_FAILED");
    }
  });
});

describe("wallet invariant (property)", () => {
  // Amounts around the edges: invalid ones, small ones and large ones that reach the limit quickly.
  const validAmount = fc.integer({ min: 1, max: 1_000_000 });
  const amount = fc.oneof(
    validAmount,
    fc.constantFrom(1_000_000, 999_999, 1),
    fc.constantFrom(0, -1, 1_000_001),
  );

  it("any sequence of charges keeps balance == sum(ledger) == newest balanceAfter, within the limit", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(amount, { maxLength: 15 }), async (amounts) => {
        const user = await makeUser();
        const token = await tokenFor(user.id);
        let expected = 0;
        for (const a of amounts) {
          const res = await charge(token, { amount: a });
          if (a < 1 || a > 1_000_000) expectProblem(res, 400, "VALIDATION_FAILED");
          else if (expected + a > LIMIT) expectProblem(res, 400, "BALANCE_LIMIT_EXCEEDED");
          else {
            expected += a;
            expect(res.body).toMatchObject({ balance: expected, transaction: { balanceAfter: expected } });
          }
        }
        expect(await expectLedgerConsistent(user.id)).toBe(expected);
      }),
      { numRuns: 20 },
    );
  });

  it("the same holds when the charges run in parallel, and every refusal was justified", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(validAmount, { minLength: 1, maxLength: 20 }), async (amounts) => {
        const user = await makeUser();
        const token = await tokenFor(user.id);
        const results = await Promise.all(amounts.map((a) => charge(token, { amount: a })));
        const applied = amounts.filter((_, i) => results[i]!.status === 200).reduce((s, a) => s + a, 0);
        const balance = await expectLedgerConsistent(user.id);
        expect(balance).toBe(applied);
        // Balances only grow here, so a charge refused earlier must still not fit at the end.
        results.forEach((r, i) => {
          if (r.status !== 200) {
            expectProblem(r, 400, "BALANCE_LIMIT_EXCEEDED");
            expect(balance + amounts[i]!).toBeGreaterThan(LIMIT);
          }
        });
      }),
      { numRuns: 20 },
    );
  });
});

describe("OpenAPI", () => {
  it("documents the wallet routes with bearer auth and the Idempotency-Key header", async () => {
    const { paths } = (await call("GET", "/openapi.json")).body;
    expect(paths["/api/balance/{userId}"].get.security).toEqual([{ bearerAuth: [] }]);
    expect(paths["/api/users/balance/history"].get.tags).toEqual(["Wallet"]);
    const charge = paths["/api/balance/charge"].post;
    expect(charge.parameters).toEqual(
      expect.arrayContaining([expect.objectContaining({ in: "header", name: "idempotency-key", required: false })]),
    );
    expect(Object.keys(charge.responses)).toEqual(expect.arrayContaining(["200", "400", "401", "403", "404", "409", "422"]));
  });

  it("documents ids as integers from 1, in the path and in the body", async () => {
    const doc = (await call("GET", "/openapi.json")).body;
    const [userIdParam] = doc.paths["/api/balance/{userId}"].get.parameters;
    expect(userIdParam.schema).toMatchObject({ type: "integer", minimum: 1, maximum: Number.MAX_SAFE_INTEGER });
    expect(doc.components.schemas.ChargeRequest.properties.userId).toMatchObject({
      type: "integer",
      minimum: 1,
      maximum: Number.MAX_SAFE_INTEGER,
    });
  });
});
