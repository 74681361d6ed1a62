import { createRoute, z } from "@hono/zod-openapi";
import { actingUserId, authenticate } from "../lib/auth";
import { bearer, createRouter, jsonBody, jsonResponse, problems } from "../lib/openapi";
import { limitWrites } from "../lib/rate-limit";
import { CouponParams, IssueBody, UserCouponSchema, UserCouponsQuery } from "./schemas";
import { issueCoupon, listUsableCoupons } from "./service";

const couponRoute = { tags: ["Coupons"], security: bearer, middleware: [authenticate] };

export const couponRoutes = createRouter()
  .openapi(
    createRoute({
      ...couponRoute,
      middleware: [authenticate, limitWrites],
      method: "post",
      path: "/coupons/{couponId}/issue",
      summary: "Issue a coupon, first come first served (an admin names the userId)",
      request: { params: CouponParams, body: jsonBody(IssueBody) },
      responses: {
        200: jsonResponse(UserCouponSchema, "The issued coupon"),
        ...problems(400, 401, 403, 404, 413, 415, 429, 503),
      },
    }),
    async (c) => {
      const { couponId } = c.req.valid("param");
      const userId = actingUserId(c.get("caller"), c.req.valid("json").userId);
      return c.json(await issueCoupon(c.env.COUPON_GATE, c.get("clock"), couponId, userId), 200);
    },
  )
  .openapi(
    createRoute({
      ...couponRoute,
      method: "get",
      path: "/users/coupons",
      summary: "The caller's usable coupons: AVAILABLE and not expired (an admin names the userId)",
      request: { query: UserCouponsQuery },
      responses: {
        200: jsonResponse(z.object({ items: z.array(UserCouponSchema) }), "Usable coupons, newest issue first"),
        ...problems(400, 401, 403),
      },
    }),
    async (c) => {
      const userId = actingUserId(c.get("caller"), c.req.valid("query").userId);
      return c.json({ items: await listUsableCoupons(c.get("db"), c.get("clock"), userId) }, 200);
    },
  );
