-- Argo CD health check for rekey.dev/SecretRotation. Install it as
-- `resource.customizations.health.rekey.dev_SecretRotation` in argocd-cm
-- (docs/gitops.md). It reads the kstatus conditions rekey writes:
--   Stalled=True                      Degraded   (the last rotation failed)
--   Reconciling=True, waiting for a   Suspended  (approval, or confirmation
--   person                                        of a manual invalidation)
--   Reconciling=True                  Progressing (a requested rotation runs)
--   Ready=True                        Healthy    (scheduled rotations too)
local hs = { status = "Progressing", message = "Waiting for rekey to look at the SecretRotation" }
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for rekey to look at generation " .. obj.metadata.generation
  return hs
end
local c = {}
for _, condition in ipairs(obj.status.conditions) do
  c[condition.type] = condition
end
if c.Stalled ~= nil and c.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = c.Stalled.message
  return hs
end
if c.Reconciling ~= nil and c.Reconciling.status == "True" then
  if c.Reconciling.reason == "AwaitingApproval" or c.Reconciling.reason == "AwaitingConfirmation" then
    hs.status = "Suspended"
  end
  hs.message = c.Reconciling.message
  return hs
end
if c.Ready ~= nil and c.Ready.status == "True" then
  hs.status = "Healthy"
end
if c.Ready ~= nil then
  hs.message = c.Ready.message
end
return hs
