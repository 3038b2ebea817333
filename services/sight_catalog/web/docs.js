// Lists the API from /openapi.json, offline (no script from anywhere else): each operation with its
// parameters, body and answers.
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function schemaName(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array") return `${schemaName(schema.items)}[]`;
  if (schema.anyOf) return schema.anyOf.map(schemaName).join(" | ");
  return schema.format ? `${schema.type} (${schema.format})` : schema.type || "";
}

async function render() {
  const target = document.getElementById("api");
  const spec = await (await fetch("/openapi.json")).json();
  target.replaceChildren(element("h2", `${spec.info.title} ${spec.info.version}`));
  target.append(element("p", spec.info.description || ""));
  for (const [path, operations] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(operations)) {
      const block = element("article", undefined, "operation");
      block.id = op.operationId || `${method}-${path}`;
      block.append(element("h3", `${method.toUpperCase()} ${path}`));
      if (op.summary) block.append(element("p", op.summary, "summary"));
      if (op.description) block.append(element("p", op.description));
      if (op.security) block.append(element("p", "Authorization: Bearer <token> (where the server asks)"));
      const params = op.parameters || [];
      if (params.length) {
        const list = element("ul");
        for (const p of params) {
          list.append(element("li", `${p.name} (${p.in}${p.required ? ", required" : ""}): ${schemaName(p.schema)}`
            + (p.description ? ` — ${p.description}` : "")));
        }
        block.append(element("h4", "Parameters"), list);
      }
      if (op.requestBody) {
        block.append(element("h4", "Body"), element("p", Object.keys(op.requestBody.content).join(", ")));
      }
      const answers = element("ul");
      for (const [status, response] of Object.entries(op.responses || {})) {
        answers.append(element("li", `${status}: ${response.description || ""}`));
      }
      block.append(element("h4", "Answers"), answers);
      target.append(block);
    }
  }
  const schemas = (spec.components && spec.components.schemas) || {};
  target.append(element("h2", "Schemas"));
  for (const [name, schema] of Object.entries(schemas)) {
    const block = element("article", undefined, "schema");
    block.id = `schema-${name}`;
    block.append(element("h3", name));
    const list = element("ul");
    for (const [field, property] of Object.entries(schema.properties || {})) {
      list.append(element("li", `${field}: ${schemaName(property)}` + (property.description ? ` — ${property.description}` : "")));
    }
    block.append(list);
    target.append(block);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  render().catch((e) => {
    document.getElementById("api").textContent = `Cannot read /openapi.json: ${e.message}`;
  });
});
