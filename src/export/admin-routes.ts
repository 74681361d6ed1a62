import { createRoute, z } from "@hono/zod-openapi";
import { bearer, createRouter, Id, jsonResponse, problems, Timestamp } from "../lib/openapi";
import { pageQuery, pageSchema } from "../lib/pagination";
import { queuesOf } from "../orders/outbox";
import { listExports, retryExport } from "./service";

const ExportSchema = z
  .object({
    id: z.number().int(),
    orderId: z.number().int(),
    event: z.enum(["PLACED", "CANCELLED"]).openapi({ description: "The order's completion, or its cancellation" }),
    status: z.enum(["PENDING", "SENT", "FAILED"]),
    attempts: z.number().int(),
    lastError: z.string().nullable(),
    createdAt: Timestamp,
    updatedAt: Timestamp,
    sentAt: Timestamp.nullable(),
  })
  .openapi("Export");

const StatusQuery = z
  .string()
  .transform((s) => s.toUpperCase())
  .pipe(z.enum(["PENDING", "SENT", "FAILED"]))
  .optional()
  .openapi({ type: "string", enum: ["pending", "failed", "sent"], description: "Any case" });

const exportRoute = { tags: ["Admin"], security: bearer };

// Mounted under /api/admin, behind authenticate + requireAdmin.
export const exportAdminRoutes = createRouter()
  .openapi(
    createRoute({
      ...exportRoute,
      method: "get",
      path: "/",
      summary: "Exports to the data platform, newest first, optionally by status",
      request: { query: pageQuery.extend({ status: StatusQuery }) },
      responses: { 200: jsonResponse(pageSchema(ExportSchema), "A page of exports"), ...problems(400, 401, 403) },
    }),
    async (c) => {
      const { status, ...page } = c.req.valid("query");
      return c.json(await listExports(c.env.DB, status, page), 200);
    },
  )
  .openapi(
    createRoute({
      ...exportRoute,
      method: "post",
      path: "/{exportId}/retry",
      summary: "Queue a FAILED export again",
      request: { params: z.object({ exportId: Id }) },
      responses: { 200: jsonResponse(ExportSchema, "The export, back to PENDING"), ...problems(400, 401, 403, 404, 409) },
    }),
    async (c) => {
      const { exportId } = c.req.valid("param");
      return c.json(await retryExport(c.env.DB, queuesOf(c.env), exportId, c.get("clock").now()), 200);
    },
  );
