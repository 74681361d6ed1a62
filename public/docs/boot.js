// Mounts the API reference: Scalar's standalone bundle (copied from npm at build, served from this origin)
// with the configuration the Worker wrote into the /docs page.
window.Scalar.createApiReference("#app", JSON.parse(document.getElementById("scalar-config").textContent));
