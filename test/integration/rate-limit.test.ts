import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import { createApp } from "../../src/app";
import { adminToken, call, expectProblem, tokenFor, type ApiResponse } from "../helpers/api";
import { fund, one } from "../helpers/db";
import { makeCoupon, makeProduct, makeUser } from "../helpers/factories";

// Per user, at most 20 state-changing requests per 10 s (wrangler.toml's WRITE_RATE_LIMITER). The Worker under
// test has a far higher limit (vitest.config.ts) so that other tests may storm from one user; here the app
// runs with the limiter as deployed, WRITE_RATE_LIMITER_AS_DEPLOYED, in its place.

const app = createApp();

async function send(method: string, path: string, token: string, body?: unknown, headers: Record<string, string> = {}, bindings: Partial<Env> = {}) {
  const init: RequestInit = { method, headers: { Authorization: `Bearer ${token}`, ...headers } };
  if (body !== undefined) init.body = JSON.stringify(body);
  if (body !== undefined) (init.headers as Record<string, string>)["Content-Type"] = "application/json";
  const ctx = createExecutionContext();
  const limited = { ...env, WRITE_RATE_LIMITER: env.WRITE_RATE_LIMITER_AS_DEPLOYED, ...bindings } as Env;
  const response = await app.fetch(new Request(`http://shop.test${path}`, init), limited, ctx);
  await waitOnExecutionContext(ctx);
  const text = await response.text();
  return { status: response.status, headers: response.headers, body: text ? JSON.parse(text) : undefined, text } as ApiResponse;
}

/** The limiter's windows are fixed 10 s windows: start a burst early in one, so it does not straddle two. */
async function startOfWindow() {
  const left = 10_000 - (Date.now() % 10_000);
  if (left < 7_000) await new Promise((resolve) => setTimeout(resolve, left + 50));
}

/** Everything a refused request could have touched, for one user. */
const footprint = (userId: number, productId: number, couponId: number, orderId: number) =>
  one<{ balance: number } & Record<string, unknown>>(
    `SELECT (SELECT balance FROM users WHERE id = ?1) AS balance,
       (SELECT count(*) FROM wallet_transactions WHERE user_id = ?1) AS ledger,
       (SELECT count(*) FROM orders WHERE user_id = ?1) AS orders,
       (SELECT status FROM orders WHERE id = ?4) AS orderStatus,
       (SELECT count(*) FROM user_coupons WHERE user_id = ?1) AS userCoupons,
       (SELECT count(*) FROM idempotency_keys WHERE scope = ?5) AS keys,
       (SELECT stock FROM products WHERE id = ?2) AS stock,
       (SELECT issued_count FROM coupons WHERE id = ?3) AS issued,
       (SELECT count(*) FROM outbox WHERE order_id = ?4) AS outbox`,
    userId,
    productId,
    couponId,
    orderId,
    `user:${userId}`,
  );

function expectRateLimited(res: ApiResponse) {
  expectProblem(res, 429, "RATE_LIMITED");
  expect(res.headers.get("Retry-After")).toBe("10");
}

describe("rate limit on state-changing requests", () => {
  it("20 pass; the 21st within the period, on any of the four routes, is 429 with Retry-After and changes nothing; then it lifts", { timeout: 60_000 }, async () => {
    const user = await makeUser();
    await fund(user.id, 100_000);
    const product = await makeProduct({ price: 1_000, stock: 50 });
    const coupon = await makeCoupon();
    const token = await tokenFor(user.id);

    await startOfWindow();
    const order = await send("POST", "/api/orders", token, { items: [{ productId: product.id, quantity: 1 }] });
    expect(order.status).toBe(200);
    const charges = await Promise.all(
      Array.from({ length: 19 }, (_, i) => send("POST", "/api/balance/charge", token, { amount: 1 }, { "Idempotency-Key": `c-${i}` })),
    );
    expect(charges.map((r) => r.status)).toEqual(new Array(19).fill(200));

    const before = await footprint(user.id, product.id, coupon.id, order.body.id);
    expect(before).toMatchObject({ balance: 100_000 - 1_000 + 19, orders: 1, orderStatus: "COMPLETED", userCoupons: 0, keys: 19 });
    expectRateLimited(await send("POST", "/api/balance/charge", token, { amount: 1 }, { "Idempotency-Key": "c-new" }));
    expectRateLimited(await send("POST", "/api/orders", token, { items: [{ productId: product.id, quantity: 1 }] }));
    expectRateLimited(await send("POST", `/api/coupons/${coupon.id}/issue`, token, {}));
    expectRateLimited(await send("POST", `/api/orders/${order.body.id}/cancel`, token, {}));
    // Checked before validation, too: an invalid body is refused for the rate, not the body.
    expectRateLimited(await send("POST", "/api/balance/charge", token, { amount: -5 }));
    // An idempotent replay counts like any request (telling it apart would take a D1 read).
    expectRateLimited(await send("POST", "/api/balance/charge", token, { amount: 1 }, { "Idempotency-Key": "c-0" }));
    expect(await footprint(user.id, product.id, coupon.id, order.body.id)).toEqual(before);

    // Retry-After is the period: after it, the user writes again (and the refused key was never stored).
    await new Promise((resolve) => setTimeout(resolve, 10 * 1_000));
    const later = await send("POST", "/api/balance/charge", token, { amount: 1 }, { "Idempotency-Key": "c-new" });
    expect(later.status).toBe(200);
    expect(later.body.balance).toBe(before.balance + 1);
  });

  it("is per user: another user, an admin and reads are not limited", async () => {
    const [limited, other] = [await makeUser(), await makeUser()];
    const token = await tokenFor(limited.id);
    const admin = await adminToken();

    await startOfWindow();
    const burst = await Promise.all(Array.from({ length: 21 }, () => send("POST", "/api/balance/charge", token, { amount: 1 })));
    expect(burst.filter((r) => r.status === 200)).toHaveLength(20);
    expectRateLimited(burst.find((r) => r.status !== 200)!);

    expect((await send("POST", "/api/balance/charge", await tokenFor(other.id), { amount: 1 })).status).toBe(200);
    const asAdmin = await Promise.all(
      Array.from({ length: 25 }, () => send("POST", "/api/balance/charge", admin, { userId: limited.id, amount: 1 })),
    );
    expect(asAdmin.map((r) => r.status)).toEqual(new Array(25).fill(200));
    const reads = await Promise.all(Array.from({ length: 25 }, () => send("GET", `/api/balance/${limited.id}`, token)));
    expect(reads.map((r) => r.status)).toEqual(new Array(25).fill(200));
    expect(reads.at(-1)!.body.balance).toBe(20 + 25);
    expectRateLimited(await send("POST", "/api/balance/charge", token, { amount: 1 }));
  });

  it("a failing limiter lets writes through and logs an error (the objects and D1 keep every invariant)", async () => {
    const user = await makeUser();
    const errors = vi.spyOn(console, "error");
    const broken = { limit: async () => Promise.reject(new Error("rate limiter unreachable")) } as unknown as RateLimit;

    const res = await send("POST", "/api/balance/charge", await tokenFor(user.id), { amount: 5 }, {}, { WRITE_RATE_LIMITER: broken });
    expect(res.status).toBe(200);
    expect(errors.mock.calls.some(([line]) => String(line).includes("rate limiter unavailable"))).toBe(true);
    errors.mockRestore();
  });

  it("the OpenAPI document gives the four routes a 429, and no read", async () => {
    const paths = (await call("GET", "/openapi.json")).body.paths;
    for (const [path, method] of [
      ["/api/balance/charge", "post"],
      ["/api/coupons/{couponId}/issue", "post"],
      ["/api/orders", "post"],
      ["/api/orders/{orderId}/cancel", "post"],
    ] as const) {
      expect(paths[path][method].responses, `${method} ${path}`).toHaveProperty("429");
    }
    expect(paths["/api/balance/{userId}"].get.responses).not.toHaveProperty("429");
    expect(paths["/api/orders"].get?.responses ?? {}).not.toHaveProperty("429");
  });
});
