"use strict";
document.getElementById("delete")?.addEventListener("click", async (ev) => {
  const id = ev.target.dataset.id, out = document.getElementById("delete-result");
  if (!confirm(`Remove scan entry ${id} from the catalog? The file stays where it is.`)) return;
  const r = await S.send("DELETE", `/api/scans/${id}`, undefined, S.token(document.getElementById("token")));
  if (r.ok) { location.href = "/scans"; return; }
  out.textContent = `not removed (${r.status}): ${r.data.error}`; out.className = "warn";
});
document.getElementById("connection").textContent = "";
