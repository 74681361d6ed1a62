import { createRoute, z } from "@hono/zod-openapi";
import { authenticate, requireAdmin } from "../lib/auth";
import { bearer, createRouter, Id, jsonBody, jsonResponse, Name, problems, Timestamp } from "../lib/openapi";
import { pageQuery, pageSchema } from "../lib/pagination";
import { createUser, listUsers } from "../users/service";
import { CreateProductBody, ProductSchema, UpdateProductBody } from "../catalog/schemas";
import { createProduct, updateProduct } from "../catalog/service";
import { couponAdminRoutes } from "../coupons/admin-routes";
import { exportAdminRoutes } from "../export/admin-routes";
import { auditAdminRoutes } from "../audit/routes";

const UserSchema = z
  .object({ id: z.number().int(), name: z.string(), balance: z.number().int(), createdAt: Timestamp })
  .openapi("User");

const CreateUserBody = z.strictObject({ name: Name(100) }).openapi("CreateUser");

const adminRoute = { tags: ["Admin"], security: bearer };

const router = createRouter();
router.use("*", authenticate, requireAdmin);
router.route("/coupons", couponAdminRoutes);
router.route("/exports", exportAdminRoutes);
router.route("/audit", auditAdminRoutes);

export const adminRoutes = router
  .openapi(
    createRoute({
      ...adminRoute,
      method: "post",
      path: "/users",
      summary: "Create a user (balance 0)",
      request: { body: jsonBody(CreateUserBody) },
      responses: { 201: jsonResponse(UserSchema, "The new user"), ...problems(400, 401, 403, 413, 415) },
    }),
    async (c) => {
      const { name } = c.req.valid("json");
      return c.json(await createUser(c.get("db"), c.get("clock"), name), 201);
    },
  )
  .openapi(
    createRoute({
      ...adminRoute,
      method: "get",
      path: "/users",
      summary: "List users, newest first",
      request: { query: pageQuery },
      responses: { 200: jsonResponse(pageSchema(UserSchema), "A page of users"), ...problems(400, 401, 403) },
    }),
    async (c) => c.json(await listUsers(c.get("db"), c.req.valid("query")), 200),
  )
  .openapi(
    createRoute({
      ...adminRoute,
      method: "post",
      path: "/products",
      summary: "Create a product",
      request: { body: jsonBody(CreateProductBody) },
      responses: { 201: jsonResponse(ProductSchema, "The new product"), ...problems(400, 401, 403, 413, 415) },
    }),
    async (c) => c.json(await createProduct(c.get("db"), c.env.CACHE, c.get("clock"), c.req.valid("json")), 201),
  )
  .openapi(
    createRoute({
      ...adminRoute,
      method: "patch",
      path: "/products/{productId}",
      summary: "Rename, reprice, restock or limit a product",
      request: { params: z.object({ productId: Id }), body: jsonBody(UpdateProductBody) },
      responses: {
        200: jsonResponse(ProductSchema, "The updated product"),
        ...problems(400, 401, 403, 404, 413, 415, 503),
      },
    }),
    async (c) => {
      const { productId } = c.req.valid("param");
      const product = await updateProduct(c.get("db"), c.env, c.get("clock"), productId, c.req.valid("json"));
      return c.json(product, 200);
    },
  );
