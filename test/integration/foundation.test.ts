import { describe, expect, it } from "vitest";
import { signToken } from "../../src/lib/auth";
import { adminToken, call, expectProblem, SECRET, tokenFor } from "../helpers/api";
import { makeUser } from "../helpers/factories";

describe("operations", () => {
  it("GET /health is public and ok", async () => {
    const res = await call("GET", "/health");
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ status: "ok" });
  });

  it("serves an OpenAPI 3.1 document with the admin paths and a bearer scheme", async () => {
    const res = await call("GET", "/openapi.json");
    expect(res.status).toBe(200);
    expect(res.body.openapi).toBe("3.1.0");
    expect(Object.keys(res.body.paths)).toEqual(
      expect.arrayContaining(["/health", "/api/admin/users", "/api/admin/products", "/api/admin/products/{productId}"]),
    );
    expect(res.body.components.securitySchemes.bearerAuth).toMatchObject({ type: "http", scheme: "bearer" });
  });

  it("documents every route of the HTTP contract (../shared/docs/api.md)", async () => {
    const contract = [
      "GET /health",
      "GET /api/balance/{userId}",
      "POST /api/balance/charge",
      "GET /api/users/balance/history",
      "GET /api/products",
      "GET /api/products/{productId}",
      "GET /api/products/popular",
      "POST /api/coupons/{couponId}/issue",
      "GET /api/users/coupons",
      "POST /api/orders",
      "GET /api/users/orders",
      "GET /api/orders/{orderId}",
      "POST /api/orders/{orderId}/cancel",
      "POST /api/admin/users",
      "GET /api/admin/users",
      "POST /api/admin/products",
      "PATCH /api/admin/products/{productId}",
      "POST /api/admin/coupons",
      "GET /api/admin/coupons/{couponId}",
      "GET /api/admin/exports",
      "POST /api/admin/exports/{exportId}/retry",
      "GET /api/admin/audit",
    ];
    const doc = (await call("GET", "/openapi.json")).body as { paths: Record<string, Record<string, unknown>> };
    const served = Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`));
    expect(served.sort()).toEqual(contract.sort());
  });

  it("documents the problem+json 500 on every API operation", async () => {
    const doc = (await call("GET", "/openapi.json")).body as { paths: Record<string, Record<string, { responses: Record<string, unknown> }>> };
    const missing = Object.entries(doc.paths)
      .filter(([path]) => path.startsWith("/api/"))
      .flatMap(([path, ops]) => Object.entries(ops).filter(([, op]) => !op.responses["500"]).map(([m]) => `${m} ${path}`));
    expect(missing).toEqual([]);
  });

  it("documents the Idempotency-Key header on every write that takes it", async () => {
    const doc = (await call("GET", "/openapi.json")).body as {
      paths: Record<string, Record<string, { parameters?: { in: string; name: string; required: boolean; schema: unknown }[] }>>;
    };
    for (const [path, method] of [
      ["/api/balance/charge", "post"],
      ["/api/orders", "post"],
      ["/api/orders/{orderId}/cancel", "post"],
    ] as const) {
      const header = doc.paths[path]![method]!.parameters?.find((p) => p.in === "header" && p.name === "idempotency-key");
      expect(header, `${method} ${path}`).toMatchObject({ required: false, schema: { type: "string", minLength: 1, maxLength: 255 } });
    }
  });

  it("serves the interactive reference at /docs", async () => {
    const res = await call("GET", "/docs");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/html");
    expect(res.text).toContain("/openapi.json");
  });
});

describe("request id", () => {
  it("generates one when none is sent", async () => {
    const res = await call("GET", "/health");
    expect(res.headers.get("x-request-id")).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("echoes a short, safe incoming id", async () => {
    const res = await call("GET", "/health", { headers: { "X-Request-Id": "trace-abc_123" } });
    expect(res.headers.get("x-request-id")).toBe("trace-abc_123");
  });

  it("replaces an unsafe or overlong id", async () => {
    for (const bad of ["has space", "x".repeat(65), "<script>"]) {
      const res = await call("GET", "/health", { headers: { "X-Request-Id": bad } });
      expect(res.headers.get("x-request-id")).not.toBe(bad);
      expect(res.headers.get("x-request-id")).toMatch(/^[0-9a-f-]{36}$/);
    }
  });

  it("puts the request id in problem bodies too", async () => {
    const res = await call("GET", "/nope", { headers: { "X-Request-Id": "req-404" } });
    expectProblem(res, 404, "NOT_FOUND");
    expect(res.body.requestId).toBe("req-404");
    expect(res.headers.get("x-request-id")).toBe("req-404");
  });
});

describe("problem+json", () => {
  it("documents only codes the API gives: a wrong method is 404 NOT_FOUND, never 405", async () => {
    const doc = (await call("GET", "/openapi.json")).body;
    expect(doc.components.schemas.Problem.properties.code.enum).not.toContain("METHOD_NOT_ALLOWED");
    expectProblem(await call("DELETE", "/api/products"), 404, "NOT_FOUND");
  });

  it("an unknown route is a 404 problem", async () => {
    const res = await call("GET", "/api/does-not-exist");
    expectProblem(res, 404, "NOT_FOUND");
    expect(res.body.status).toBe(404);
  });

  it("sets secure headers", async () => {
    const res = await call("GET", "/health");
    expect(res.headers.get("x-content-type-options")).toBe("nosniff");
  });
});

describe("authentication", () => {
  const path = "/api/admin/users";

  it("401 without a token", async () => {
    expectProblem(await call("GET", path), 401, "UNAUTHENTICATED");
  });

  it("401 for a non-bearer or garbled header", async () => {
    expectProblem(await call("GET", path, { headers: { Authorization: "Basic abc" } }), 401, "UNAUTHENTICATED");
    expectProblem(await call("GET", path, { token: "not.a.jwt" }), 401, "UNAUTHENTICATED");
  });

  it("401 for an expired token", async () => {
    const expired = await signToken(SECRET, { sub: "0", role: "admin" }, -60, Date.now());
    expectProblem(await call("GET", path, { token: expired }), 401, "UNAUTHENTICATED");
  });

  it("401 for a token signed with another secret", async () => {
    const forged = await signToken("another-secret", { sub: "0", role: "admin" }, 60, Date.now());
    expectProblem(await call("GET", path, { token: forged }), 401, "UNAUTHENTICATED");
  });

  it("401 for an unsigned (alg none) token", async () => {
    const b64 = (o: object) => btoa(JSON.stringify(o)).replaceAll("=", "").replaceAll("+", "-").replaceAll("/", "_");
    const none = `${b64({ alg: "none", typ: "JWT" })}.${b64({ sub: "0", role: "admin", exp: 4102444800 })}.x`;
    expectProblem(await call("GET", path, { token: none }), 401, "UNAUTHENTICATED");
  });

  it("401 for a token without exp or with an unknown role", async () => {
    const { sign } = await import("hono/jwt");
    const noExp = await sign({ sub: "0", role: "admin" }, SECRET, "HS256");
    expectProblem(await call("GET", path, { token: noExp }), 401, "UNAUTHENTICATED");
    const badRole = await signToken(SECRET, { sub: "1", role: "root" as never }, 60, Date.now());
    expectProblem(await call("GET", path, { token: badRole }), 401, "UNAUTHENTICATED");
  });

  it("401 for a user subject that is not a safe integer (it would name another user)", async () => {
    for (const sub of ["9007199254740993", "9999999999999999", "01", "1.0"]) {
      expectProblem(await call("GET", "/api/users/coupons", { token: await tokenFor(sub) }), 401, "UNAUTHENTICATED");
    }
    const largest = await call("GET", "/api/users/coupons", { token: await tokenFor(String(Number.MAX_SAFE_INTEGER)) });
    expect(largest.status).toBe(200);
  });

  it("403 for a user on an admin route", async () => {
    expectProblem(await call("GET", path, { token: await tokenFor(1) }), 403, "FORBIDDEN");
  });
});

describe("request bodies", () => {
  it("malformed JSON is a 400 problem", async () => {
    const res = await call("POST", "/api/admin/users", { token: await adminToken(), body: "{not json" });
    expectProblem(res, 400, "MALFORMED_JSON");
  });

  it("a non-JSON body is 415", async () => {
    const res = await call("POST", "/api/admin/users", {
      token: await adminToken(),
      body: "name=x",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
    });
    expectProblem(res, 415, "UNSUPPORTED_MEDIA_TYPE");
  });

  it("a request with no body and no Content-Type is 415, not read as an empty object", async () => {
    const res = await call("POST", "/api/admin/users", { token: await adminToken() });
    expectProblem(res, 415, "UNSUPPORTED_MEDIA_TYPE");
  });

  it("a body over 1 MiB is 413, with or without Content-Length", async () => {
    const big = JSON.stringify({ name: "x".repeat(1024 * 1024 + 10) });
    const res = await call("POST", "/api/admin/users", { token: await adminToken(), body: big });
    expectProblem(res, 413, "PAYLOAD_TOO_LARGE");

    const chunks = new TextEncoder().encode(big);
    const stream = new ReadableStream({
      start(controller) {
        for (let i = 0; i < chunks.length; i += 64 * 1024) controller.enqueue(chunks.slice(i, i + 64 * 1024));
        controller.close();
      },
    });
    const { exports } = await import("cloudflare:workers");
    const chunked = await exports.default.fetch(
      new Request("http://shop.test/api/admin/users", {
        method: "POST",
        headers: { Authorization: `Bearer ${await adminToken()}`, "Content-Type": "application/json" },
        body: stream,
        // @ts-expect-error duplex is required for streaming bodies
        duplex: "half",
      }),
    );
    expect(chunked.status).toBe(413);
    expect(((await chunked.json()) as { code: string }).code).toBe("PAYLOAD_TOO_LARGE");
  });

  it("ids have one spelling, and names refuse C1 controls and line separators", async () => {
    const token = await adminToken();
    expectProblem(await call("PATCH", "/api/admin/products/001", { token, body: { price: 1 } }), 400, "VALIDATION_FAILED");
    expectProblem(await call("GET", "/api/products/01"), 400, "VALIDATION_FAILED");
    for (const name of ["a\u0085b", "a\u2028b", "a\u009Fb"]) {
      expectProblem(await call("POST", "/api/admin/users", { token, body: { name } }), 400, "VALIDATION_FAILED");
    }
    expect((await call("POST", "/api/admin/users", { token, body: { name: "김민준" } })).status).toBe(201);
  });

  it("unknown fields are rejected, not silently ignored", async () => {
    const res = await call("POST", "/api/admin/users", { token: await adminToken(), body: { name: "a", balance: 999 } });
    expectProblem(res, 400, "VALIDATION_FAILED");
    expect(res.body.errors.length).toBeGreaterThan(0);
  });

  it("validation errors list each failing path", async () => {
    const res = await call("POST", "/api/admin/products", {
      token: await adminToken(),
      body: { name: "", price: 1.5, stock: -1 },
    });
    expectProblem(res, 400, "VALIDATION_FAILED");
    const paths = res.body.errors.map((e: { path: string }) => e.path).sort();
    expect(paths).toEqual(["name", "price", "stock"]);
  });
});

describe("admin users", () => {
  it("rejects a name with control characters", async () => {
    const token = await adminToken();
    for (const name of ["a\u0000b", "line\nbreak", "tab\tname", "trailing\r\n", "del\u007F"]) {
      const res = await call("POST", "/api/admin/users", { token, body: { name } });
      expectProblem(res, 400, "VALIDATION_FAILED");
      expect(res.body.errors.map((e: { path: string }) => e.path)).toContain("name");
    }
    expect((await call("POST", "/api/admin/users", { token, body: { name: "  Kim Min-jun é 김민준  " } })).body.name).toBe(
      "Kim Min-jun é 김민준",
    );
  });

  it("creates a user with balance 0", async () => {
    const res = await call("POST", "/api/admin/users", { token: await adminToken(), body: { name: "Kim" } });
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject({ name: "Kim", balance: 0 });
    expect(res.body.id).toBeGreaterThan(0);
    expect(res.body.createdAt).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  });

  it("lists users newest first across pages without repeats", async () => {
    const created: { id: number }[] = [];
    for (let i = 0; i < 5; i++) created.push(await makeUser());
    const token = await adminToken();
    const seen: number[] = [];
    let cursor: string | null = null;
    do {
      const query: string = cursor ? `?limit=2&cursor=${cursor}` : "?limit=2";
      const res = await call("GET", `/api/admin/users${query}`, { token });
      expect(res.status).toBe(200);
      expect(res.body.items.length).toBeLessThanOrEqual(2);
      seen.push(...res.body.items.map((u: { id: number }) => u.id));
      cursor = res.body.nextCursor;
    } while (cursor);
    expect(new Set(seen).size).toBe(seen.length);
    const ours = seen.filter((id) => created.some((u) => u.id === id));
    expect(ours).toEqual(created.map((u) => u.id).reverse());
  });

  it("rejects a garbled or forged cursor with 400, not 500", async () => {
    const token = await adminToken();
    for (const cursor of ["!!!", "bm90LWpzb24", btoa(JSON.stringify(["yesterday", -1]))]) {
      const res = await call("GET", `/api/admin/users?cursor=${encodeURIComponent(cursor)}`, { token });
      expectProblem(res, 400, "VALIDATION_FAILED");
    }
  });

  it("refuses a cursor taken from another list", async () => {
    const token = await adminToken();
    await makeUser();
    await makeUser();
    const users = await call("GET", "/api/admin/users?limit=1", { token });
    const cursor = users.body.nextCursor as string;
    expect(cursor).toEqual(expect.any(String));
    expect((await call("GET", `/api/admin/users?limit=1&cursor=${cursor}`, { token })).status).toBe(200);
    expectProblem(await call("GET", `/api/products?cursor=${cursor}`), 400, "VALIDATION_FAILED");
    expectProblem(await call("GET", `/api/admin/exports?cursor=${cursor}`, { token }), 400, "VALIDATION_FAILED");
  });

  it("rejects an out-of-range limit", async () => {
    const res = await call("GET", "/api/admin/users?limit=101", { token: await adminToken() });
    expectProblem(res, 400, "VALIDATION_FAILED");
  });
});

describe("admin products", () => {
  it("creates, renames, reprices and restocks", async () => {
    const token = await adminToken();
    const created = await call("POST", "/api/admin/products", { token, body: { name: "Mug", price: 12000, stock: 5 } });
    expect(created.status).toBe(201);
    expect(created.body).toMatchObject({ name: "Mug", price: 12000, stock: 5 });

    const patched = await call("PATCH", `/api/admin/products/${created.body.id}`, {
      token,
      body: { name: "Big mug", price: 15000, stockDelta: -2 },
    });
    expect(patched.status).toBe(200);
    expect(patched.body).toMatchObject({ id: created.body.id, name: "Big mug", price: 15000, stock: 3 });
  });

  it("refuses a stock change below zero and changes nothing", async () => {
    const token = await adminToken();
    const created = await call("POST", "/api/admin/products", { token, body: { name: "Cup", price: 5000, stock: 2 } });
    const res = await call("PATCH", `/api/admin/products/${created.body.id}`, {
      token,
      body: { name: "Renamed", stockDelta: -3 },
    });
    expectProblem(res, 400, "OUT_OF_STOCK");
    const { env } = await import("cloudflare:workers");
    const row = await env.DB.prepare("SELECT name, stock FROM products WHERE id = ?").bind(created.body.id).first();
    expect(row).toEqual({ name: "Cup", stock: 2 });
  });

  it("404 for an unknown product, 400 for a non-numeric id or an empty patch", async () => {
    const token = await adminToken();
    expectProblem(await call("PATCH", "/api/admin/products/999999", { token, body: { price: 1 } }), 404, "PRODUCT_NOT_FOUND");
    expectProblem(await call("PATCH", "/api/admin/products/abc", { token, body: { price: 1 } }), 400, "VALIDATION_FAILED");
    expectProblem(await call("PATCH", "/api/admin/products/1", { token, body: {} }), 400, "VALIDATION_FAILED");
  });

  it("rejects a product name with control characters, on create and on rename", async () => {
    const token = await adminToken();
    const created = await call("POST", "/api/admin/products", { token, body: { name: "Mug", price: 1, stock: 1 } });
    for (const name of ["Mug\u0000", "Big\nmug", "Mug\u001F", "Mug\u007F"]) {
      expectProblem(await call("POST", "/api/admin/products", { token, body: { name, price: 1, stock: 1 } }), 400, "VALIDATION_FAILED");
      expectProblem(await call("PATCH", `/api/admin/products/${created.body.id}`, { token, body: { name } }), 400, "VALIDATION_FAILED");
    }
  });

  it("users cannot create products", async () => {
    const res = await call("POST", "/api/admin/products", {
      token: await tokenFor(1),
      body: { name: "x", price: 1, stock: 1 },
    });
    expectProblem(res, 403, "FORBIDDEN");
  });
});
