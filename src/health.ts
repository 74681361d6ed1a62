import { createRoute, z } from "@hono/zod-openapi";
import { createRouter, jsonResponse } from "./lib/openapi";

export const healthRoutes = createRouter().openapi(
  createRoute({
    method: "get",
    path: "/health",
    tags: ["Operations"],
    summary: "Liveness",
    responses: { 200: jsonResponse(z.object({ status: z.literal("ok") }), "The Worker is up") },
  }),
  (c) => c.json({ status: "ok" as const }, 200),
);
