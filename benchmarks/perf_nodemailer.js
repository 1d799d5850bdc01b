// benchmarks/perf.py's Nodemailer client: the pooled SMTP transport, one connection.
// Reads a JSON config line on stdin, sends the warm-up messages, prints "ready",
// waits for "go", sends the measured messages (all queued at once: the pool of one
// connection sends them one after another), prints "done" and closes.
"use strict";
const fs = require("fs");
const readline = require("readline");
const nodemailer = require("nodemailer");

const lines = readline.createInterface({ input: process.stdin });
const queue = [];
let waiting = null;
lines.on("line", (line) => {
  if (waiting) {
    const resolve = waiting;
    waiting = null;
    resolve(line);
  } else {
    queue.push(line);
  }
});
const nextLine = () =>
  queue.length ? Promise.resolve(queue.shift()) : new Promise((r) => (waiting = r));

async function main() {
  const config = JSON.parse(await nextLine());
  const options = {
    pool: true,
    maxConnections: 1,
    maxMessages: Infinity,
    host: "127.0.0.1",
    port: config.port,
    secure: false,
    name: "bench.example",
  };
  if (config.tls) {
    options.requireTLS = true;
    options.auth = { user: config.user, pass: config.password };
    options.tls = { ca: [fs.readFileSync(config.ca)], servername: "localhost" };
  } else {
    options.ignoreTLS = true;
  }
  const transport = nodemailer.createTransport(options);
  const mail = {
    envelope: { from: "app@example.com", to: ["ann@example.org"] },
    raw: config.message,
  };
  const send = (count) =>
    Promise.all(Array.from({ length: count }, () => transport.sendMail(mail)));
  await send(config.warmUp);
  process.stdout.write("ready\n");
  if ((await nextLine()).trim() !== "go") throw new Error("expected go");
  await send(config.messages);
  process.stdout.write("done\n");
  transport.close();
  lines.close();
}

main().catch((error) => {
  process.stderr.write(`perf_nodemailer: ${error.stack || error}\n`);
  process.exit(1);
});
