// Reads a BUDGET_EXHAUSTED refusal's details from Node, with stubs built from proto/ alone
// (ours and the vendored google/rpc). The README shows this file; tests/e2e/test_node_client.py
// runs it against a real ledger.
//   npm install @grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1   (protobufjs comes with them)
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO = process.env.TOKENLEDGER_PROTO || "proto"; // this repository's proto/
const TARGET = process.env.TOKENLEDGER_TARGET || "127.0.0.1:50051";
const [tenant, user] = [process.env.TENANT || "acme", process.env.USER_ID || "alice"];

const def = loader.loadSync("tokenledger/v1/ledger.proto", { includeDirs: [PROTO], keepCase: true });
const { LedgerService } = grpc.loadPackageDefinition(def).tokenledger.v1;
const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => path.join(PROTO, target);
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = rpc.lookupType("google.rpc.Status");

// Every refusal carries a google.rpc.Status in the grpc-status-details-bin trailer.
function details(err) {
  const [bin] = err.metadata.get("grpc-status-details-bin");
  return Status.decode(bin).details.map((any) => {
    const type = rpc.lookupType(any.type_url.split("/").pop());
    return { type: type.fullName.slice(1), ...type.toObject(type.decode(any.value)) };
  });
}

const ledger = new LedgerService(TARGET, grpc.credentials.createInsecure());
const request = { idempotency_key: `node-${Date.now()}`, tenant_id: tenant, user_id: user,
                  model: "gpt-4o", amount: 100000000 };
ledger.Reserve(request, (err, reply) => {
  if (!err) return console.log("reserved", reply.reservation.reservation_id);
  const info = details(err).find((d) => d.type === "google.rpc.ErrorInfo");
  const quota = details(err).find((d) => d.type === "google.rpc.QuotaFailure");
  console.log(JSON.stringify({ code: grpc.status[err.code], reason: info.reason,
                               metadata: info.metadata, quota: quota.violations[0].subject }));
  process.exitCode = info.reason === "BUDGET_EXHAUSTED" ? 0 : 1;
  ledger.close();
});
