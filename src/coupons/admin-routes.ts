import { createRoute } from "@hono/zod-openapi";
import { bearer, createRouter, jsonBody, jsonResponse, problems } from "../lib/openapi";
import { CouponParams, CouponSchema, CreateCouponBody } from "./schemas";
import { createCoupon, getCoupon } from "./service";

// Mounted under /api/admin, whose router authenticates and requires an admin for every route.
const adminRoute = { tags: ["Admin"], security: bearer };

export const couponAdminRoutes = createRouter()
  .openapi(
    createRoute({
      ...adminRoute,
      method: "post",
      path: "/",
      summary: "Create a coupon",
      request: { body: jsonBody(CreateCouponBody) },
      responses: { 201: jsonResponse(CouponSchema, "The new coupon"), ...problems(400, 401, 403, 413, 415) },
    }),
    async (c) => c.json(await createCoupon(c.get("db"), c.get("clock"), c.req.valid("json")), 201),
  )
  .openapi(
    createRoute({
      ...adminRoute,
      method: "get",
      path: "/{couponId}",
      summary: "A coupon with its issued count",
      request: { params: CouponParams },
      responses: { 200: jsonResponse(CouponSchema, "The coupon"), ...problems(400, 401, 403, 404) },
    }),
    async (c) => c.json(await getCoupon(c.get("db"), c.req.valid("param").couponId), 200),
  );
