import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { adminToken, call, expectProblem } from "../helpers/api";
import { countingD1 } from "../helpers/counting-d1";
import { makeProduct, makeUser } from "../helpers/factories";

type Product = {
  id: number;
  name: string;
  price: number;
  stock: number;
  maxPerUser: number | null;
  createdAt: string;
  updatedAt: string;
};
type ListPage = { items: Product[]; nextCursor: string | null };

const setName = (id: number, name: string) =>
  env.DB.prepare("UPDATE products SET name = ? WHERE id = ?").bind(name, id).run();

const stockObject = (productId: number) => env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));
const limitInD1 = async (id: number) =>
  (await env.DB.prepare("SELECT max_per_user FROM products WHERE id = ?").bind(id).first<{ max_per_user: number | null }>())!
    .max_per_user;
const patch = async (id: number, body: unknown) =>
  call("PATCH", `/api/admin/products/${id}`, { token: await adminToken(), body });

const firstPage = () => call<ListPage>("GET", "/api/products?limit=100");
const listed = (page: ListPage, id: number) => page.items.find((p) => p.id === id);

describe("GET /api/products", () => {
  it("is public and lists products newest first, paging without repeats", async () => {
    const created: Product[] = [];
    for (let i = 0; i < 4; i++) created.push(await makeProduct());
    const seen: number[] = [];
    let cursor: string | null = null;
    do {
      const query: string = cursor ? `?limit=2&cursor=${cursor}` : "?limit=2";
      const res = await call<ListPage>("GET", `/api/products${query}`);
      expect(res.status).toBe(200);
      expect(res.body.items.length).toBeLessThanOrEqual(2);
      seen.push(...res.body.items.map((p) => p.id));
      cursor = res.body.nextCursor;
    } while (cursor);
    expect(new Set(seen).size).toBe(seen.length);
    const ours = seen.filter((id) => created.some((p) => p.id === id));
    expect(ours).toEqual(created.map((p) => p.id).reverse());
  });

  it("returns full product objects", async () => {
    const product = await makeProduct({ name: "Teapot", price: 23000, stock: 4 });
    const res = await firstPage();
    expect(listed(res.body, product.id)).toEqual(product);
  });

  it("serves a second read from KV, not D1 (hit), until the entry's version changes", async () => {
    const product = await makeProduct({ name: "Original" });
    const miss = await firstPage();
    expect(listed(miss.body, product.id)?.name).toBe("Original");

    await setName(product.id, "Changed behind the cache");
    const hit = await firstPage();
    expect(listed(hit.body, product.id)?.name).toBe("Original");
    expect(hit.text).toBe(miss.text);
  });

  it("50 concurrent reads of a cold first page make one D1 query and all get the same body", async () => {
    const product = await makeProduct();
    const d1 = countingD1(/from "products"/);
    const app = createApp();
    const answers = await Promise.all(Array.from({ length: 50 }, () => d1.get(app, "/api/products?limit=77")));
    expect(answers.every((a) => a.status === 200)).toBe(true);
    expect(new Set(answers.map((a) => a.text)).size).toBe(1);
    expect(listed(JSON.parse(answers[0]!.text), product.id)).toEqual(product);
    expect(d1.count()).toBe(1);
  });

  it("caches each page and limit separately (a different query is a miss)", async () => {
    const product = await makeProduct({ name: "Paged" });
    await call("GET", "/api/products?limit=99");
    await setName(product.id, "Paged, renamed");
    const other = await call<ListPage>("GET", "/api/products?limit=98");
    expect(listed(other.body, product.id)?.name).toBe("Paged, renamed");
  });

  it("is fresh at once after an admin creates a product", async () => {
    await firstPage();
    const created = await makeProduct();
    expect(listed((await firstPage()).body, created.id)).toEqual(created);
  });

  it("is fresh at once after an admin PATCH", async () => {
    const product = await makeProduct({ name: "Before", stock: 5 });
    expect(listed((await firstPage()).body, product.id)?.name).toBe("Before");
    const patched = await call("PATCH", `/api/admin/products/${product.id}`, {
      token: await adminToken(),
      body: { name: "After", stockDelta: 2 },
    });
    expect(patched.status).toBe(200);
    expect(listed((await firstPage()).body, product.id)).toMatchObject({ name: "After", stock: 7 });
  });

  it("keeps the cache when an admin PATCH fails", async () => {
    const product = await makeProduct({ name: "Steady", stock: 1 });
    await firstPage();
    await setName(product.id, "Steady, renamed directly");
    const refused = await call("PATCH", `/api/admin/products/${product.id}`, {
      token: await adminToken(),
      body: { stockDelta: -5 },
    });
    expectProblem(refused, 400, "OUT_OF_STOCK");
    expect(listed((await firstPage()).body, product.id)?.name).toBe("Steady");
  });

  it("sends Cache-Control and a strong ETag; If-None-Match with it gives a bodiless 304", async () => {
    await makeProduct();
    const res = await firstPage();
    expect(res.headers.get("cache-control")).toBe("public, no-cache");
    expect(res.headers.get("content-type")).toContain("application/json");
    const tag = res.headers.get("etag");
    expect(tag).toMatch(/^"[0-9a-f]{64}"$/);
    // The tag is the SHA-256 of the very bytes sent (worked out once per cached body, not per response).
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(res.text)));
    expect(tag).toBe(`"${Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("")}"`);

    const again = await call("GET", "/api/products?limit=100", {
      headers: { "If-None-Match": tag!, "X-Request-Id": "revalidate-1" },
    });
    expect(again.status).toBe(304);
    expect(again.text).toBe("");
    expect(again.headers.get("etag")).toBe(tag);
    expect(again.headers.get("cache-control")).toBe("public, no-cache");
    expect(again.headers.get("x-request-id")).toBe("revalidate-1");

    const list = await call("GET", "/api/products?limit=100", { headers: { "If-None-Match": `"other", W/${tag}` } });
    expect(list.status).toBe(304);
  });

  it("answers 200 with a new ETag once the list changed", async () => {
    const before = await firstPage();
    await makeProduct();
    const after = await call("GET", "/api/products?limit=100", { headers: { "If-None-Match": before.headers.get("etag")! } });
    expect(after.status).toBe(200);
    expect(after.headers.get("etag")).not.toBe(before.headers.get("etag"));
  });

  it("rejects a bad limit or a garbled cursor with 400", async () => {
    expectProblem(await call("GET", "/api/products?limit=0"), 400, "VALIDATION_FAILED");
    expectProblem(await call("GET", "/api/products?limit=101"), 400, "VALIDATION_FAILED");
    for (const limit of ["0x10", "1e1", "%201", "1%20", "+5", "5.0", "", "abc"]) {
      expectProblem(await call("GET", `/api/products?limit=${limit}`), 400, "VALIDATION_FAILED");
    }
    expectProblem(await call("GET", "/api/products?cursor=!!!"), 400, "VALIDATION_FAILED");
    expectProblem(await call("GET", "/api/products?cursor=bm90LWpzb24"), 400, "VALIDATION_FAILED");
  });
});

describe("GET /api/products/{productId}", () => {
  it("is public and returns the product", async () => {
    const product = await makeProduct({ name: "Kettle", price: 45000, stock: 3 });
    const res = await call("GET", `/api/products/${product.id}`);
    expect(res.status).toBe(200);
    expect(res.body).toEqual(product);
  });

  it("is exact on stock right after a stock PATCH, even while the list is cached", async () => {
    const product = await makeProduct({ stock: 10 });
    expect((await call("GET", `/api/products/${product.id}`)).body.stock).toBe(10);
    await firstPage();
    const patched = await call("PATCH", `/api/admin/products/${product.id}`, {
      token: await adminToken(),
      body: { stockDelta: -4 },
    });
    expect(patched.status).toBe(200);
    expect((await call("GET", `/api/products/${product.id}`)).body.stock).toBe(6);

    // A stock change that bypasses the admin route (as an order does) is seen at once too.
    await env.DB.prepare("UPDATE products SET stock = stock - 1 WHERE id = ?").bind(product.id).run();
    const res = await call("GET", `/api/products/${product.id}`);
    expect(res.body.stock).toBe(5);
    expect(res.headers.get("cache-control")).toBe("no-store");
  });

  it("404 PRODUCT_NOT_FOUND for an unknown id", async () => {
    expectProblem(await call("GET", "/api/products/999999999"), 404, "PRODUCT_NOT_FOUND");
  });

  it("400 VALIDATION_FAILED for an id that is not plain decimal digits, or is zero or too large", async () => {
    for (const id of ["abc", "0", "-1", "1.5", "1e3x", "99999999999999999999", "1e3", "0x10", "0b1", "%201", "1%20", "+1", "Infinity"]) {
      expectProblem(await call("GET", `/api/products/${id}`), 400, "VALIDATION_FAILED");
    }
  });

  it("/popular is not taken for a product id", async () => {
    const res = await call("GET", "/api/products/popular");
    expect(res.status).toBe(200);
    expect(Array.isArray(res.body.items)).toBe(true);
  });
});

describe("admin products: maxPerUser", () => {
  it("creates a product with a limit, without one, or with null (no limit)", async () => {
    const limited = await makeProduct({ name: "Drop sneaker", maxPerUser: 2 });
    expect(limited).toMatchObject({ name: "Drop sneaker", maxPerUser: 2 });
    expect(await limitInD1(limited.id)).toBe(2);
    expect((await call("GET", `/api/products/${limited.id}`)).body).toEqual(limited);

    for (const product of [await makeProduct(), await makeProduct({ maxPerUser: null })]) {
      expect(product.maxPerUser).toBeNull();
      expect(await limitInD1(product.id)).toBeNull();
      expect((await call("GET", `/api/products/${product.id}`)).body).toEqual(product);
    }
  });

  it("PATCH sets, changes and removes the limit in D1 and in the product's stock object at once", async () => {
    const product = await makeProduct({ name: "Console", price: 5000, stock: 8 });
    const user = await makeUser();
    // The object has loaded the product (no limit) before any PATCH: it must learn each change from the PATCH.
    expect(await stockObject(product.id).check(product.id, 5, user.id)).toMatchObject({ ok: true });

    const set = await patch(product.id, { maxPerUser: 2 });
    expect(set.status).toBe(200);
    expect(set.body).toMatchObject({ id: product.id, name: "Console", price: 5000, stock: 8, maxPerUser: 2 });
    expect(await limitInD1(product.id)).toBe(2);
    expect(await stockObject(product.id).check(product.id, 3, user.id)).toMatchObject({
      ok: false,
      reason: "PURCHASE_LIMIT_EXCEEDED",
      maxPerUser: 2,
    });
    expect(await stockObject(product.id).check(product.id, 2, user.id)).toMatchObject({ ok: true });

    const changed = await patch(product.id, { name: "Console X", stockDelta: 3, maxPerUser: 4 });
    expect(changed.body).toMatchObject({ name: "Console X", stock: 11, maxPerUser: 4 });
    expect(await stockObject(product.id).check(product.id, 5, user.id)).toMatchObject({ reason: "PURCHASE_LIMIT_EXCEEDED" });

    const removed = await patch(product.id, { maxPerUser: null });
    expect(removed.body).toMatchObject({ name: "Console X", stock: 11, maxPerUser: null });
    expect(await limitInD1(product.id)).toBeNull();
    expect(await stockObject(product.id).check(product.id, 11, user.id)).toMatchObject({ ok: true });
    expect(await stockObject(product.id).snapshot(product.id)).toEqual({ stock: 11, reserved: 0, available: 11 });
    expect((await call("GET", `/api/products/${product.id}`)).body).toEqual(removed.body);
  });

  it("a PATCH of the limit alone keeps name, price and stock, and the cached list shows it at once", async () => {
    const product = await makeProduct({ name: "Limited", price: 700, stock: 3 });
    expect(listed((await firstPage()).body, product.id)?.maxPerUser).toBeNull();
    const res = await patch(product.id, { maxPerUser: 1 });
    expect(res.body).toMatchObject({ name: "Limited", price: 700, stock: 3, maxPerUser: 1, createdAt: product.createdAt });
    expect(listed((await firstPage()).body, product.id)).toEqual(res.body);
  });

  it("400 VALIDATION_FAILED for a limit that is not a positive integer, on create and on PATCH; nothing changes", async () => {
    const token = await adminToken();
    const product = await makeProduct({ maxPerUser: 3 });
    for (const maxPerUser of [0, -1, 1.5, "2", true, 1_000_001]) {
      const created = await call("POST", "/api/admin/products", { token, body: { name: "x", price: 1, stock: 1, maxPerUser } });
      expectProblem(created, 400, "VALIDATION_FAILED");
      expect(created.body.errors.map((e: { path: string }) => e.path), String(maxPerUser)).toEqual(["maxPerUser"]);
      const patched = await patch(product.id, { maxPerUser });
      expectProblem(patched, 400, "VALIDATION_FAILED");
      expect(patched.body.errors.map((e: { path: string }) => e.path), String(maxPerUser)).toEqual(["maxPerUser"]);
    }
    expect(await limitInD1(product.id)).toBe(3);
  });

  it("404 PRODUCT_NOT_FOUND for a limit on an unknown product", async () => {
    expectProblem(await patch(999_999_999, { maxPerUser: 2 }), 404, "PRODUCT_NOT_FOUND");
    expectProblem(await patch(999_999_999, { maxPerUser: null }), 404, "PRODUCT_NOT_FOUND");
  });
});

describe("OpenAPI", () => {
  it("documents the public catalog paths without security", async () => {
    const doc = (await call("GET", "/openapi.json")).body;
    for (const path of ["/api/products", "/api/products/popular", "/api/products/{productId}"]) {
      expect(doc.paths[path]?.get, path).toBeDefined();
      expect(doc.paths[path].get.security, path).toBeUndefined();
      expect(doc.paths[path].get.tags, path).toEqual(["Catalog"]);
    }
  });

  it("documents the product id and the limit as integers with their bounds", async () => {
    const doc = (await call("GET", "/openapi.json")).body;
    const [productId] = doc.paths["/api/products/{productId}"].get.parameters;
    expect(productId.schema).toMatchObject({ type: "integer", minimum: 1 });
    const limit = doc.paths["/api/products"].get.parameters.find((p: { name: string }) => p.name === "limit");
    expect(limit.schema).toMatchObject({ type: "integer", minimum: 1, maximum: 100, default: 20 });
  });

  it("documents maxPerUser on the product and in the admin create and PATCH bodies", async () => {
    const { schemas } = (await call("GET", "/openapi.json")).body.components;
    expect(schemas.Product.required).toContain("maxPerUser");
    expect(schemas.Product.properties.maxPerUser.type).toEqual(["integer", "null"]);
    for (const body of [schemas.CreateProduct, schemas.UpdateProduct]) {
      expect(body.required ?? []).not.toContain("maxPerUser");
      expect(body.properties.maxPerUser).toMatchObject({ type: ["integer", "null"], minimum: 1 });
    }
  });
});
