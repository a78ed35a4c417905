// Types for keyport.js (kept by hand beside it). Protocol: KeyPort wire protocol v1.

/** Binary input: bytes, or standard base64 with padding. */
export type Binary = ArrayBuffer | ArrayBufferView | string;

export type DigestAlgorithm = 'SHA-256' | 'SHA-384' | 'SHA-512' | 'SM3';
export type SignatureAlgorithm = 'RSASSA-PKCS1-v1_5' | 'RSA-PSS' | 'ECDSA' | 'Ed25519' | 'SM2';
export type KeyAlgorithm = 'RSA-2048' | 'RSA-3072' | 'RSA-4096' | 'EC-P256' | 'EC-P384' | 'EC-P521' | 'Ed25519' | 'SM2';
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** WebSocket close codes the agent sends. `IDLE` (1000): an idle connection of an origin not approved was closed; the next call reconnects. */
export declare const CloseCode: Readonly<{
  IDLE: 1000;
  GOING_AWAY: 1001;
  PROTOCOL_ERROR: 1002;
  UNSUPPORTED_DATA: 1003;
  INVALID_UTF8: 1007;
  MESSAGE_TOO_BIG: 1009;
}>;

/** Reasons sent by the agent (docs/protocol.md, "Errors"). */
export type AgentReason =
  | 'PARSE_ERROR' | 'INVALID_REQUEST' | 'METHOD_NOT_FOUND' | 'INVALID_PARAMS'
  | 'ORIGIN_NOT_APPROVED' | 'ORIGIN_DENIED' | 'USER_CANCELLED' | 'PIN_INCORRECT' | 'PIN_LOCKED'
  | 'TOKEN_NOT_PRESENT' | 'CERTIFICATE_NOT_FOUND' | 'KEY_USAGE_NOT_ALLOWED' | 'ALGORITHM_NOT_SUPPORTED'
  | 'BUSY' | 'TIMEOUT' | 'RATE_LIMITED' | 'PIN_FROM_PAGE_REFUSED' | 'TOKEN_ERROR' | 'INTERNAL';
/** Reasons of the client's own (`code === null`). */
export type ClientReason = 'AGENT_NOT_RUNNING' | 'LOOPBACK_BLOCKED' | 'CONNECTION_LOST' | 'ABORTED' | 'CLOSED' | 'BAD_RESPONSE';
export type ErrorReason = AgentReason | ClientReason;

export declare const DEFAULT_URL: 'ws://127.0.0.1:47333/v1';
export declare const PROTOCOL_VERSION: 1;
export declare const Reason: { readonly [R in ErrorReason]: R };

export declare class KeyPortError extends Error {
  constructor(reason: ErrorReason, message: string, options?: { code?: number | null; data?: object; cause?: unknown });
  readonly name: 'KeyPortError';
  /** What happened, for code to match on. Always equal to `data.reason`. */
  reason: ErrorReason;
  /** The JSON-RPC error code, or null for the client's own reasons. */
  code: number | null;
  /** The protocol's `error.data` (e.g. `countLow`, `finalTry`, `completed`), or the client's diagnosis. */
  data: { reason: ErrorReason; [key: string]: unknown };
  /** sign.batch failing mid-way: the signatures finished before the failure, decoded. */
  results?: SignResult[];
}

export interface ConnectOptions {
  /** Default `ws://127.0.0.1:47333/v1`. */
  url?: string;
  /** Default `globalThis.WebSocket`; in Node pass e.g. the `ws` package's class. */
  WebSocket?: new (url: string) => WebSocket;
  /** How long the WebSocket handshake may take, ms (default 15000; a loopback permission prompt holds it). */
  timeoutMs?: number;
  /** Backoff between reconnect attempts, or false for none. Defaults 500 ms ×2 up to 15000 ms. */
  reconnect?: false | { initialDelayMs?: number; maxDelayMs?: number; factor?: number };
  /** Where the connect-failure diagnosis looks for navigator, document, location (default globalThis). */
  globals?: object;
}

/** Options every call takes. */
export interface CallOptions {
  /** Aborting fails the call with ABORTED and sends `cancel` for it. */
  signal?: AbortSignal;
  /** Client-side deadline, ms: like an abort when it passes. */
  timeoutMs?: number;
}

/** A call's promise, with the JSON-RPC id of its request (for `cancel`). */
export type Call<T> = Promise<T> & { requestId: number };

export interface HelloResult {
  agent: 'keyport';
  version: string;
  protocol: number;
  origin: string;
  originApproved: boolean;
  capabilities: string[];
}

export interface Token {
  id: string;
  label: string;
  manufacturer: string;
  model: string;
  serial: string;
  reader: string | null;
  pinPad: boolean;
  pin: { initialized: boolean; countLow: boolean; finalTry: boolean; locked: boolean };
}

export interface CertificateFilter {
  keyUsage?: string[];
  issuer?: string;
  subject?: string;
  /** 'now' or an RFC 3339 time. */
  validAt?: string;
  /** Exact names or families: 'RSA', 'EC', 'Ed25519'. */
  keyAlgorithm?: string[];
  tokenId?: string;
}

export interface CertificateInfo {
  id: string;
  tokenId: string;
  /** DER bytes. */
  certificate: Uint8Array;
  certificateBase64: string;
  subject: string;
  issuer: string;
  serialNumber: string;
  notBefore: string;
  notAfter: string;
  keyAlgorithm: KeyAlgorithm;
  keyUsage: string[];
  extendedKeyUsage: string[];
}

/** A digest: `{algorithm, value}`, or bare bytes whose algorithm `hash` names (default SHA-256). */
export type DigestInput = Binary | { algorithm?: DigestAlgorithm; value: Binary };

export interface SignOptions extends CallOptions {
  certificateId: string;
  /** The digest to sign (exclusive with `data`). */
  digest?: DigestInput;
  /** The data for the agent to hash and sign (required for Ed25519). */
  data?: Binary;
  /** With `data`: its hash (default SHA-256). With a bare-bytes digest: the digest's algorithm (not sent). */
  hash?: DigestAlgorithm;
  signatureAlgorithm?: SignatureAlgorithm;
  format?: 'raw' | 'cms';
  /** ECDSA and SM2: DER (default) or r ‖ s. */
  ecdsaEncoding?: 'der' | 'p1363';
  /** SM2 with `data`, raw output: the signer's user ID in Z (default '1234567812345678'). */
  sm2UserId?: string;
  display: { title: string; summary?: string };
}

export interface SignResult {
  signature: Uint8Array;
  signatureBase64: string;
  format?: 'raw' | 'cms';
  signatureAlgorithm?: SignatureAlgorithm;
  digestAlgorithm?: DigestAlgorithm;
  certificate?: Uint8Array;
  certificateBase64?: string;
}

export interface BatchItem {
  digest?: DigestInput;
  data?: Binary;
  label?: string;
}

export interface SignBatchOptions extends Omit<SignOptions, 'digest' | 'data'> {
  /** 1 to 1000 items. */
  items: BatchItem[];
  /** Called on each `sign.progress` event of this request. */
  onProgress?: (progress: { requestId: number; done: number; total: number }) => void;
}

export interface AuthenticateOptions extends CallOptions {
  /** The relying party's nonce, exactly as it sent it (base64, 44–1024 characters); bytes are base64-encoded. */
  challenge: string | ArrayBuffer | ArrayBufferView;
  certificateId?: string;
  /** 'PS256' to ask RSA-PSS for an RSA key. */
  algorithm?: string;
}

/** A Web eID authentication token (format web-eid:1.0), to send to the relying party unchanged. */
export interface WebEidAuthToken {
  unverifiedCertificate: string;
  algorithm: string;
  signature: string;
  format: 'web-eid:1.0';
  appVersion: string;
}

export interface ConnectDiagnosis {
  reason: 'AGENT_NOT_RUNNING' | 'LOOPBACK_BLOCKED';
  certainty: 'certain' | 'likely';
  evidence: string[];
  permission?: 'granted' | 'denied' | 'prompt';
}

export declare class KeyPort {
  static connect(options?: ConnectOptions): Promise<KeyPort>;
  constructor(options?: ConnectOptions);
  readonly state: ConnectionState;
  readonly url: string;

  hello(client?: { name: string; version: string }, options?: CallOptions): Call<HelloResult>;
  requestAccess(options?: CallOptions): Call<{ approved: boolean; remembered: boolean }>;
  listTokens(options?: CallOptions): Call<Token[]>;
  listCertificates(filter?: CertificateFilter, options?: CallOptions): Call<CertificateInfo[]>;
  sign(options: SignOptions): Call<SignResult>;
  signBatch(options: SignBatchOptions): Call<SignResult[]>;
  authenticate(options: AuthenticateOptions): Call<WebEidAuthToken>;
  generateKey(options: {
    tokenId: string;
    /** 'SM2' on SKF keys (token ids `skf-…`), the others on PKCS#11 tokens. */
    algorithm: 'EC-P256' | 'EC-P384' | 'RSA-2048' | 'RSA-3072' | 'Ed25519' | 'SM2';
    /** The key's label (SKF: the name of the container the key is made in). */
    label: string;
    subject: string;
    alwaysAuthenticate?: boolean;
  } & CallOptions): Call<{ keyId: string; csr: Uint8Array; csrBase64: string }>;
  /** A renewal for a key that has a certificate is stored beside it unless `replace`. */
  importCertificate(options: { tokenId: string; certificate: Binary; replace?: boolean } & CallOptions):
    Call<{ certificateId: string }>;
  cancel(requestId: number | string, options?: CallOptions): Call<{ cancelled: boolean }>;

  onTokensChanged(callback: (tokens: Token[], params: { tokens: Token[] }) => void): () => void;
  onStateChange(callback: (state: ConnectionState, detail: { closeCode?: number; closeReason?: string }) => void): () => void;
  close(): void;
}

export declare function diagnoseConnectFailure(options?: { globals?: object; elapsedMs?: number; timedOut?: boolean }): Promise<ConnectDiagnosis>;
export declare function toBytes(value: Binary, what?: string): Uint8Array;
export declare function toBase64(value: Binary, what?: string): string;
export declare function fromBase64(text: string, what?: string): Uint8Array;
