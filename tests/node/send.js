// nodemailer as the application: one campaign to the relay over SMTP (issue 12 corpus).
// Usage: node send.js PORT COUNT WHERE   (WHERE: to, cc or both)
// NODE_PATH must hold nodemailer (bash .ci/run installs it under .ci/node_modules).
"use strict";
const nodemailer = require("nodemailer");

const [port, count, where] = [Number(process.argv[2]), Number(process.argv[3]), process.argv[4]];
const names = ["Ann Lee", "Zoë Müller", "Jürgen Groß", "Søren Ødegård", "Анна Петрова", "李小龍", "Ñandú 🎉"];
const domains = ["example.com", "example.net", "example.org"];
const all = [];
for (let i = 0; i < count; i++) {
  const address = `customer${String(i).padStart(5, "0")}@${domains[i % 3]}`;
  all.push({ name: `${names[i % names.length]} ${i}`, address });
}
const half = Math.max(1, Math.floor(count / 2));
const to = where === "to" ? all : where === "cc" ? [] : all.slice(0, half);
const cc = where === "cc" ? all : where === "to" ? [] : all.slice(half);

const transport = nodemailer.createTransport({
  host: "127.0.0.1", port, secure: false, ignoreTLS: true, name: "app.example.org",
});
transport.sendMail({
  from: { name: "Example News", address: "news@example.org" },
  to, cc,
  subject: "Your November update ✓",
  text: "Hello,\n.a line that starts with a dot\n",
  messageId: "<nodemailer.1@mail.example.org>",
}).then((info) => {
  process.stdout.write(JSON.stringify({ accepted: info.accepted.length, rejected: info.rejected.length, response: info.response }) + "\n");
}).catch((err) => {
  process.stderr.write(String(err) + "\n");
  process.exit(1);
});
