import { createRoute, z } from "@hono/zod-openapi";
import { etag } from "hono/etag";
import type { Context } from "hono";
import { createRouter, Id, jsonResponse, problems } from "../lib/openapi";
import { pageQuery, pageSchema } from "../lib/pagination";
import type { AppEnv } from "../env";
import { popularBody } from "./popular";
import { PopularSchema, ProductSchema } from "./schemas";
import { getProduct, productListBody } from "./service";
import { sha256Hex } from "../lib/sha256";

const catalogRoute = { tags: ["Catalog"] };

// If-None-Match on a route's ETag (set by the route: see etagOf) gets a bodiless 304.
const revalidation = etag({ retainedHeaders: ["cache-control", "etag", "vary", "x-request-id"] });

const notModified = { 304: { description: "Not modified: the If-None-Match ETag is current" } };

/**
 * A strong ETag: the SHA-256 of the body's bytes, worked out once per body this isolate serves rather than
 * by reading a clone of every response, since the cache hands the same text out many times. The tags of
 * the bodies served last are kept (least recently served goes first), so one-off pages cannot push out the
 * hot ones for long.
 */
const etags = new Map<string, Promise<string>>();
const ETAGS_KEPT = 64;

function etagOf(body: string): Promise<string> {
  let tag = etags.get(body);
  if (tag !== undefined) {
    etags.delete(body);
  } else {
    if (etags.size >= ETAGS_KEPT) etags.delete(etags.keys().next().value!);
    tag = sha256Hex(body).then((hex) => `"${hex}"`);
    tag.catch(() => etags.delete(body));
  }
  etags.set(body, tag);
  return tag;
}

/**
 * A JSON body from the KV cache. Clients and CDNs may store it but must revalidate (a cheap 304 thanks to
 * the ETag): the server's own cache already uses the whole staleness the contract allows (60 s, 30 min).
 */
async function cachedJson(c: Context<AppEnv>, body: string) {
  return c.body(body, 200, { "Content-Type": "application/json", "Cache-Control": "public, no-cache", ETag: await etagOf(body) });
}

/** Cache refreshes and writes outlive the response (and a client that hung up) under the request's waitUntil. */
const waitUntilOf = (c: Context<AppEnv>) => (work: Promise<unknown>) => c.executionCtx.waitUntil(work);

export const catalogRoutes = createRouter()
  .openapi(
    createRoute({
      ...catalogRoute,
      method: "get",
      path: "/",
      summary: "List products, newest first (cached, up to 60 s stale)",
      middleware: [revalidation] as const,
      request: { query: pageQuery },
      responses: {
        200: jsonResponse(pageSchema(ProductSchema), "A page of products"),
        ...notModified,
        ...problems(400),
      },
    }),
    async (c) => cachedJson(c, await productListBody(c.get("db"), c.env.CACHE, c.req.valid("query"), waitUntilOf(c))),
  )
  // Registered before /{productId} so "popular" is never taken for an id.
  .openapi(
    createRoute({
      ...catalogRoute,
      method: "get",
      path: "/popular",
      summary: "Top 5 products by quantity sold over the last 3 days and today (UTC; cached up to 30 min)",
      middleware: [revalidation] as const,
      responses: { 200: jsonResponse(PopularSchema, "The ranking"), ...notModified, ...problems() },
    }),
    async (c) => cachedJson(c, await popularBody(c.get("db"), c.env.CACHE, c.get("clock").now(), waitUntilOf(c))),
  )
  .openapi(
    createRoute({
      ...catalogRoute,
      method: "get",
      path: "/{productId}",
      summary: "One product, read from D1 (never stale on stock)",
      request: { params: z.object({ productId: Id }) },
      responses: { 200: jsonResponse(ProductSchema, "The product"), ...problems(400, 404) },
    }),
    async (c) => {
      const product = await getProduct(c.env.DB, c.req.valid("param").productId);
      c.header("Cache-Control", "no-store");
      return c.json(product, 200);
    },
  );
