import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { adminToken, call, expectProblem } from "../helpers/api";
import { countingD1 } from "../helpers/counting-d1";
import { makeProduct } from "../helpers/factories";

type Product = { id: number; name: string; price: number; stock: number; createdAt: string; updatedAt: string };
type ListPage = { items: Product[]; nextCursor: string | null };

const setName = (id: number, name: string) =>
  env.DB.prepare("UPDATE products SET name = ? WHERE id = ?").bind(name, id).run();

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
});
