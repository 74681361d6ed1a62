import { createRoute, type z } from "@hono/zod-openapi";
import { actingUserId, authenticate } from "../lib/auth";
import { checkIdempotencyKey, idempotent } from "../lib/idempotency";
import { limitWrites } from "../lib/rate-limit";
import { bearer, createRouter, idempotencyKeyParameter, jsonBody, jsonResponse, jsonText, problems } from "../lib/openapi";
import { pageSchema } from "../lib/pagination";
import {
  BalanceParams,
  BalanceSchema,
  ChargeBody,
  ChargeResultSchema,
  HistoryQuery,
  TransactionSchema,
} from "./schemas";
import { chargeBalance, getBalance, listTransactions } from "./service";

const walletRoute = { tags: ["Wallet"], security: bearer, middleware: [authenticate] };

export const walletRoutes = createRouter()
  .openapi(
    createRoute({
      ...walletRoute,
      method: "get",
      path: "/balance/{userId}",
      summary: "A user's balance (a user reads only their own)",
      request: { params: BalanceParams },
      responses: { 200: jsonResponse(BalanceSchema, "The balance"), ...problems(400, 401, 403, 404) },
    }),
    async (c) => {
      const userId = actingUserId(c.get("caller"), c.req.valid("param").userId);
      return c.json(await getBalance(c.get("db"), userId), 200);
    },
  )
  .openapi(
    createRoute({
      ...walletRoute,
      middleware: [authenticate, limitWrites, checkIdempotencyKey],
      method: "post",
      path: "/balance/charge",
      summary: "Charge a wallet (idempotent with Idempotency-Key)",
      parameters: [idempotencyKeyParameter],
      request: { body: jsonBody(ChargeBody) },
      responses: {
        200: jsonResponse(ChargeResultSchema, "The new balance and its ledger entry"),
        ...problems(400, 401, 403, 404, 409, 413, 415, 422, 429),
      },
    }),
    async (c) =>
      idempotent(c, async (claim) => {
        const { userId, amount } = c.req.valid("json");
        const target = actingUserId(c.get("caller"), userId);
        const charged = await chargeBalance(c.env.DB, c.get("clock"), target, amount, claim);
        return jsonText<z.infer<typeof ChargeResultSchema>>(c, charged);
      }),
  )
  .openapi(
    createRoute({
      ...walletRoute,
      method: "get",
      path: "/users/balance/history",
      summary: "Wallet transactions, newest first (an admin names the userId)",
      request: { query: HistoryQuery },
      responses: {
        200: jsonResponse(pageSchema(TransactionSchema), "A page of transactions"),
        ...problems(400, 401, 403, 404),
      },
    }),
    async (c) => {
      const { userId, ...page } = c.req.valid("query");
      const target = actingUserId(c.get("caller"), userId);
      return c.json(await listTransactions(c.get("db"), target, page), 200);
    },
  );
