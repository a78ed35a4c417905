// The parts the browser test runs against: a SoftHSM token, the scripted pinentry, the real
// `keyport` agent with its demo portal, a second static server for another origin, Chromium.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const TARGET = process.env.CARGO_TARGET_DIR ? path.resolve(ROOT, process.env.CARGO_TARGET_DIR) : path.join(ROOT, 'target');
export const KEYPORT = path.join(TARGET, 'debug', 'keyport');
export const PINENTRY = path.join(TARGET, 'debug', 'keyport-test-pinentry');
/** The soft SKF library (tests/soft-skf): the SM2 USB key the demo shows beside SoftHSM. */
export const SOFT_SKF = path.join(TARGET, 'debug', 'libkeyport_soft_skf.so');
export const CHROMIUM = process.env.KEYPORT_CHROMIUM || '/usr/bin/chromium';
export const SOFTHSM_MODULE = process.env.KEYPORT_SOFTHSM_MODULE || '/usr/lib/softhsm/libsofthsm2.so';
export const USER_PIN = '123456'; // softhsm-config/provision.sh

/** The flags that work for Debian's Chromium as root, headless (TEST-RIG-FACTS.md). */
export const CHROMIUM_ARGS = [
  '--headless=new',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-dev-shm-usage',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export function requireBuilt() {
  for (const file of [KEYPORT, PINENTRY, SOFT_SKF]) {
    if (!fs.existsSync(file)) throw new Error(`${file} is missing: run \`cargo build -p agent -p keyport-e2e -p keyport-soft-skf\` first`);
  }
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium`);
}

export function tempDir(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Provisions a fresh SoftHSM token store in DIR/hsm; returns its softhsm2.conf. */
export function provisionToken(dir) {
  const hsm = path.join(dir, 'hsm');
  const run = spawnSync('bash', [path.join(ROOT, 'softhsm-config', 'provision.sh'), hsm], { encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`provision.sh failed (${run.status}): ${run.stderr}`);
  return { conf: path.join(hsm, 'softhsm2.conf'), certDir: path.join(hsm, 'certs') };
}

/** A port that was free a moment ago (bind 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** The scripted pinentry's scenario (one JSON answer a line) and its transcript. */
export class PinentryScript {
  constructor(dir) {
    this.script = path.join(dir, 'pinentry-script.jsonl');
    this.log = path.join(dir, 'pinentry-log.jsonl');
    fs.writeFileSync(this.script, '');
    fs.writeFileSync(this.log, '');
  }

  push(step) {
    fs.appendFileSync(this.script, `${JSON.stringify(step)}\n`);
  }

  env() {
    return { KEYPORT_PINENTRY_SCRIPT: this.script, KEYPORT_PINENTRY_LOG: this.log };
  }

  /** Steps consumed so far (the pinentry keeps its cursor beside the script). */
  consumed() {
    try {
      return Number(fs.readFileSync(`${this.script}.cursor`, 'utf8').trim());
    } catch (err) {
      if (err.code === 'ENOENT') return 0;
      throw err;
    }
  }

  /** The transcript grouped into dialogs, one per pinentry process, in order. */
  dialogs() {
    const lines = fs.readFileSync(this.log, 'utf8').split('\n').filter((l) => l.trim());
    const byPid = new Map();
    for (const entry of lines.map((l) => JSON.parse(l))) {
      if (!byPid.has(entry.pid)) byPid.set(entry.pid, { pid: entry.pid, errors: [] });
      const d = byPid.get(entry.pid);
      if (entry.error) d.errors.push(entry.error);
      if (entry.cmd === 'SETDESC') d.description = entry.arg;
      if (entry.cmd === 'SETTITLE') d.title = entry.arg;
      if (entry.cmd === 'GETPIN' || entry.cmd === 'CONFIRM') {
        d.command = entry.cmd;
        if (entry.answered) d.answered = entry.answered;
      }
    }
    return [...byPid.values()];
  }
}

/**
 * A soft SKF key store in DIR/skf-key (softhsm-config/provision-skf.sh: SM2 keys and certificates
 * from an SM2 test CA, PIN 123456) and a private copy of the library: `{ library, env }`.
 */
export function provisionSkf(dir) {
  const store = path.join(dir, 'skf-key');
  const run = spawnSync('bash', [path.join(ROOT, 'softhsm-config', 'provision-skf.sh'), store], { encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`provision-skf.sh failed (${run.status}): ${run.stderr}`);
  const library = path.join(store, 'libsoftskf.so');
  fs.copyFileSync(SOFT_SKF, library);
  return { library, env: { KEYPORT_SOFT_SKF_DIR: path.join(store, 'skf') } };
}

/** Writes DIR/config.toml for the agent (with an SKF library when `skfLibrary` is given). */
export function writeConfig(dir, { allowedOrigins, unknownOrigins, skfLibrary }) {
  const auditKey = path.join(dir, 'audit.key');
  fs.writeFileSync(auditKey, randomBytes(32), { mode: 0o600 });
  const q = (s) => JSON.stringify(s); // a TOML basic string is a JSON string for these paths
  const file = path.join(dir, 'config.toml');
  fs.writeFileSync(
    file,
    [
      'port = 0',
      'discover_modules = false',
      `pinentry = ${q(PINENTRY)}`,
      `audit_key_file = ${q(auditKey)}`,
      `audit_log = ${q(path.join(dir, 'audit.log'))}`,
      `allowed_origins = [${allowedOrigins.map(q).join(', ')}]`,
      'denied_origins = []',
      `unknown_origins = ${q(unknownOrigins)}`,
      'allow_insecure_localhost_origins = true',
      'pin_cache_seconds = 0',
      'dialog_timeout_seconds = 60',
      'signing_key_usage = "non-repudiation"',
      '[[modules]]',
      `path = ${q(SOFTHSM_MODULE)}`,
      ...(skfLibrary ? ['[[skf_modules]]', `path = ${q(skfLibrary)}`] : []),
      '',
    ].join('\n'),
  );
  return file;
}

/**
 * Starts `keyport --config F run --demo-port D` and resolves once it printed both its
 * `listening on ws://…` and `demo portal on http://…` lines (no sleeps: it reads stdout).
 */
export function startAgent({ config, demoPort, env }) {
  const child = spawn(KEYPORT, ['--config', config, 'run', '--demo-port', String(demoPort)], {
    env: { ...process.env, ...env, RUST_LOG: process.env.RUST_LOG || 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  const ready = new Promise((resolve, reject) => {
    let wsUrl = null;
    const lines = readline.createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      const listening = /^listening on (ws:\/\/127\.0\.0\.1:\d+\/v1)$/.exec(line);
      const demo = /^demo portal on (http:\/\/127\.0\.0\.1:\d+\/\?agent=\S+)$/.exec(line);
      if (listening) wsUrl = listening[1];
      if (demo) resolve({ wsUrl, demoUrl: demo[1] });
    });
    child.once('exit', (code, signal) => reject(new Error(`keyport exited (${code ?? signal}) before it was ready:\n${stderr}`)));
    child.once('error', reject);
  });
  return {
    child,
    ready,
    stderr: () => stderr,
    stop() {
      if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      return exited;
    },
  };
}

/** The demo's files as the agent serves them (demo/ at /, the client at /src/keyport.js). */
const DEMO_FILES = {
  '/': ['demo/index.html', 'text/html; charset=utf-8'],
  '/index.html': ['demo/index.html', 'text/html; charset=utf-8'],
  '/demo.js': ['demo/demo.js', 'text/javascript; charset=utf-8'],
  '/verify.js': ['demo/verify.js', 'text/javascript; charset=utf-8'],
  '/texts.js': ['demo/texts.js', 'text/javascript; charset=utf-8'],
  '/demo.css': ['demo/demo.css', 'text/css; charset=utf-8'],
  '/src/keyport.js': ['src/keyport.js', 'text/javascript; charset=utf-8'],
};

/** Serves the same demo files from another origin; `createServer` lets a test pick https. */
export function serveDemoCopy({ port = 0, host = '127.0.0.1', createServer = (h) => http.createServer(h) } = {}) {
  const js = path.join(ROOT, 'browser-bridge', 'js');
  const server = createServer((req, res) => {
    const entry = DEMO_FILES[new URL(req.url, 'http://x').pathname];
    if (!entry || req.method !== 'GET') {
      res.writeHead(404).end();
      return;
    }
    const body = fs.readFileSync(path.join(js, entry[0]));
    res.writeHead(200, { 'Content-Type': entry[1], 'Cache-Control': 'no-store' }).end(body);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve({ server, port: server.address().port }));
  });
}

/** `keyport --config F certs --json`: the certificates with their ids and token labels. */
export function listCertificatesCli(config, env) {
  const run = spawnSync(KEYPORT, ['--config', config, 'certs', '--json'], { env: { ...process.env, ...env }, encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`keyport certs --json failed: ${run.stderr}`);
  return JSON.parse(run.stdout);
}
