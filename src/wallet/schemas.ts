import { z } from "@hono/zod-openapi";
import { BALANCE_LIMIT } from "../db/schema";
import { Id, PositiveId, Timestamp } from "../lib/openapi";
import { pageQuery } from "../lib/pagination";

export const MAX_CHARGE = 1_000_000;

export const ChargeBody = z
  .strictObject({
    userId: PositiveId.optional().openapi({ description: "Defaults to the caller; required for an admin" }),
    amount: z
      .number()
      .int()
      .min(1)
      .max(MAX_CHARGE)
      .openapi({ example: 10_000, description: `Won, 1..${MAX_CHARGE}; the balance may not pass ${BALANCE_LIMIT}` }),
  })
  .openapi("ChargeRequest");

export type ChargeInput = z.infer<typeof ChargeBody>;

export const TransactionSchema = z
  .object({
    id: z.number().int(),
    type: z.enum(["CHARGE", "PAYMENT", "REFUND"]),
    amount: z.number().int().openapi({ description: "Positive for CHARGE and REFUND, negative for PAYMENT" }),
    balanceAfter: z.number().int(),
    orderId: z.number().int().nullable(),
    createdAt: Timestamp,
  })
  .openapi("Transaction");

export const BalanceSchema = z
  .object({ userId: z.number().int(), balance: z.number().int(), updatedAt: Timestamp })
  .openapi("Balance");

export const ChargeResultSchema = z
  .object({ userId: z.number().int(), balance: z.number().int(), transaction: TransactionSchema })
  .openapi("ChargeResult");

export const BalanceParams = z.object({ userId: Id });

export const HistoryQuery = pageQuery.extend({
  userId: Id.optional().openapi({ description: "Whose history; required for an admin, the caller's own for a user" }),
});
