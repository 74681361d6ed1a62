import type { ContentfulStatusCode } from "hono/utils/http-status";

// The one table of business and protocol failures. Clients branch on `code`, never on `title`.
export const ERRORS = {
  VALIDATION_FAILED: { status: 400, title: "The request is not valid" },
  MALFORMED_JSON: { status: 400, title: "The request body is not valid JSON" },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, title: "The request body must be application/json" },
  PAYLOAD_TOO_LARGE: { status: 413, title: "The request body is too large" },
  UNAUTHENTICATED: { status: 401, title: "Authentication is required" },
  FORBIDDEN: { status: 403, title: "This action is not allowed for the caller" },
  NOT_FOUND: { status: 404, title: "No such resource" },
  USER_NOT_FOUND: { status: 404, title: "User not found" },
  PRODUCT_NOT_FOUND: { status: 404, title: "Product not found" },
  COUPON_NOT_FOUND: { status: 404, title: "Coupon not found" },
  ORDER_NOT_FOUND: { status: 404, title: "Order not found" },
  EXPORT_NOT_FOUND: { status: 404, title: "Export not found" },
  BALANCE_LIMIT_EXCEEDED: { status: 400, title: "The balance would exceed its limit" },
  INSUFFICIENT_BALANCE: { status: 400, title: "The balance is too low" },
  OUT_OF_STOCK: { status: 400, title: "Not enough stock" },
  PURCHASE_LIMIT_EXCEEDED: { status: 400, title: "The order passes the product's limit per customer" },
  COUPON_SOLD_OUT: { status: 400, title: "The coupon is sold out" },
  COUPON_ALREADY_ISSUED: { status: 400, title: "The coupon was already issued to this user" },
  COUPON_NOT_ISSUABLE: { status: 400, title: "The coupon cannot be issued now" },
  COUPON_NOT_USABLE: { status: 400, title: "The coupon cannot be used for this order" },
  EXPORT_NOT_FAILED: { status: 409, title: "Only a failed export can be retried" },
  ORDER_NOT_CANCELLABLE: { status: 409, title: "The order cannot be cancelled" },
  IDEMPOTENCY_KEY_REUSED: { status: 422, title: "The idempotency key was used with another request" },
  IDEMPOTENCY_IN_PROGRESS: { status: 409, title: "A request with this idempotency key is still running" },
  RATE_LIMITED: { status: 429, title: "Too many requests" },
  SERVICE_UNAVAILABLE: { status: 503, title: "The service is temporarily unavailable" },
  INTERNAL: { status: 500, title: "Internal server error" },
} as const satisfies Record<string, { status: ContentfulStatusCode; title: string }>;

export type ErrorCode = keyof typeof ERRORS;

export interface FieldError {
  path: string;
  message: string;
}

export class AppError extends Error {
  readonly code: ErrorCode;
  readonly status: ContentfulStatusCode;
  readonly errors?: FieldError[];

  constructor(code: ErrorCode, detail?: string, errors?: FieldError[]) {
    super(detail ?? ERRORS[code].title);
    this.name = "AppError";
    this.code = code;
    this.status = ERRORS[code].status;
    this.errors = errors;
  }
}

/** The detail of an order whose write may or may not have committed. */
export const ORDER_OUTCOME_UNKNOWN = "The order may or may not have been placed; retry with the same Idempotency-Key";

/**
 * A write whose outcome is unknown (its reply was lost: it may or may not have committed). It answers 503,
 * and an idempotency claim is kept rather than released, so a retry with the same key continues the same
 * effect instead of starting a second one.
 */
export class OutcomeUnknownError extends AppError {
  constructor(detail: string, options?: { cause?: unknown }) {
    super("SERVICE_UNAVAILABLE", detail);
    this.name = "OutcomeUnknownError";
    if (options?.cause !== undefined) this.cause = options.cause;
  }
}

export interface Problem {
  type: string;
  title: string;
  status: number;
  code: ErrorCode;
  detail: string;
  requestId: string;
  errors?: FieldError[];
}

export function toProblem(error: AppError, requestId: string): Problem {
  const problem: Problem = {
    type: `https://errors.edge-shop.dev/${error.code.toLowerCase().replaceAll("_", "-")}`,
    title: ERRORS[error.code].title,
    status: error.status,
    code: error.code,
    detail: error.message,
    requestId,
  };
  if (error.errors) problem.errors = error.errors;
  return problem;
}
