import { createRoute, z } from "@hono/zod-openapi";
import { actingUserId, authenticate } from "../lib/auth";
import { checkIdempotencyKey, idempotent } from "../lib/idempotency";
import { limitWrites } from "../lib/rate-limit";
import { runToEnd } from "../lib/run-to-end";
import { bearer, createRouter, Id, idempotencyKeyParameter, jsonBody, jsonResponse, jsonText, problems } from "../lib/openapi";
import { pageQuery, pageSchema } from "../lib/pagination";
import { queuesOf } from "./outbox";
import { positiveIntegerSetting } from "../lib/settings";
import { cancelOrder } from "./cancel-order";
import { knownSoldOut, placeOrder, type PlaceOrderDeps } from "./place-order";
import { getOrderJson, listOrders } from "./queries";
import { CancelOrderBody, OrderSchema, PlaceOrderBody, type OrderDto } from "./schemas";

const orderRoute = { tags: ["Orders"], security: bearer, middleware: [authenticate] };

export const orderRoutes = createRouter()
  .openapi(
    createRoute({
      ...orderRoute,
      middleware: [authenticate, limitWrites, checkIdempotencyKey],
      method: "post",
      path: "/orders",
      summary: "Place an order paid from the wallet, optionally with a coupon; all or nothing",
      parameters: [idempotencyKeyParameter],
      request: { body: jsonBody(PlaceOrderBody) },
      responses: {
        200: jsonResponse(OrderSchema, "The completed order"),
        ...problems(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
      },
    }),
    async (c) => {
      const input = c.req.valid("json");
      const userId = actingUserId(c.get("caller"), input.userId);
      const place = async (key: Pick<PlaceOrderDeps, "claim" | "claimToMake">) => {
        const order = await placeOrder(
          {
            env: c.env,
            clock: c.get("clock"),
            queues: queuesOf(c.env),
            defer: (work) => c.executionCtx.waitUntil(work),
            ...key,
          },
          userId,
          input,
        );
        return jsonText<OrderDto>(c, order);
      };
      // The order runs to its end even if the client hangs up (Workers cancel what is not under waitUntil):
      // from its reservation on, only its own end commits or gives back what it holds. The Idempotency-Key
      // of a one-product order is claimed by the product's object, with its group's other keys.
      return runToEnd(
        c.executionCtx,
        idempotent(c, (claim) => place({ claim }), {
          refuseEarly: () => knownSoldOut(input),
          claimInHandler: input.items.length === 1 ? (claimToMake) => place({ claim: null, claimToMake }) : undefined,
        }),
      );
    },
  )
  .openapi(
    createRoute({
      ...orderRoute,
      middleware: [authenticate, limitWrites, checkIdempotencyKey],
      method: "post",
      path: "/orders/{orderId}/cancel",
      summary:
        "Cancel an order: refund to the wallet, stock and coupon back, exactly once (a user within the window, an admin any time)",
      parameters: [idempotencyKeyParameter],
      request: {
        params: z.object({ orderId: Id }),
        body: { ...jsonBody(CancelOrderBody), required: false },
      },
      responses: {
        200: jsonResponse(OrderSchema, "The cancelled order"),
        ...problems(400, 401, 404, 409, 413, 415, 422, 429, 503),
      },
    }),
    async (c) => {
      const { orderId } = c.req.valid("param");
      const reason = c.req.valid("json")?.reason ?? null;
      return runToEnd(
        c.executionCtx,
        idempotent(c, async (claim) => {
          const order = await cancelOrder(
            {
              env: c.env,
              clock: c.get("clock"),
              queues: queuesOf(c.env),
              defer: (work) => c.executionCtx.waitUntil(work),
              claim,
              windowSeconds: positiveIntegerSetting("ORDER_CANCEL_WINDOW_SECONDS", c.env.ORDER_CANCEL_WINDOW_SECONDS, 86_400),
            },
            c.get("caller"),
            orderId,
            reason,
          );
          return jsonText<OrderDto>(c, order);
        }),
      );
    },
  )
  .openapi(
    createRoute({
      ...orderRoute,
      method: "get",
      path: "/users/orders",
      summary: "The caller's orders, newest first (an admin names the user with ?userId=)",
      request: { query: pageQuery.extend({ userId: Id.optional() }) },
      responses: { 200: jsonResponse(pageSchema(OrderSchema), "A page of orders"), ...problems(400, 401, 403) },
    }),
    async (c) => {
      const { userId: requested, ...page } = c.req.valid("query");
      const userId = actingUserId(c.get("caller"), requested);
      return c.json(await listOrders(c.env.DB, userId, page), 200);
    },
  )
  .openapi(
    createRoute({
      ...orderRoute,
      method: "get",
      path: "/orders/{orderId}",
      summary: "One order (404 for another user's order; admins read any)",
      request: { params: z.object({ orderId: Id }) },
      responses: { 200: jsonResponse(OrderSchema, "The order"), ...problems(400, 401, 404) },
    }),
    async (c) => {
      const order = await getOrderJson(c.env.DB, c.get("caller"), c.req.valid("param").orderId);
      return jsonText<OrderDto>(c, order);
    },
  );
