// sd-webui-hypernetworks: tooltips for the extension's settings and editor, and a "sort by hash"
// control on the Hypernetworks page. Every global name starts with hnx.

var hnxTooltips = {
    "Default multiplier": "Strength of <hypernet:name> written without a number, and of a clicked card that has no preferred multiplier.",
    "Extra folders with hypernetworks": "More folders to list besides --hypernetwork-dir, one per line. Subfolders are included; links leading out of a folder are not.",
    "Loaded networks kept in memory": "How many networks stay loaded after they leave the prompt, so switching back is instant. Networks in use are always kept.",
    "Precision of the hypernetwork layers": "Automatic runs the networks in their own float32, like A1111. float16/bfloat16 save memory on large networks.",
    "Unknown network names and malformed tags": "What happens when a tag names no file or has a bad argument. The other tags still apply unless the generation is stopped.",
    "Networks made for another model family (an SD1 network on SDXL)": "A network whose text width belongs to another model family would only change the image's self-attention. Skip it, or apply it anyway.",
    "Add Hypernet hashes to infotext": "Writes 'Hypernet hashes: name: hash' so pasted parameters find the same files even when they are named differently.",
    "Always show all networks on the Hypernetworks page": "Otherwise cards of networks made for another model family than the loaded checkpoint are hidden.",
    "Block weight presets": "Your own per-block vectors, one per line as NAME: 1,1,0,... (16 values for SD1/SD2, 11 for SDXL). Use them as bw=NAME in a tag.",
    "Alias": "Another name that works in <hypernet:...>; it must not contain : < > , / or \\.",
    "Preferred multiplier": "The multiplier a click on the card inserts; 0 uses the Default multiplier setting.",
    "Activation text": "Text added to the prompt after the tag when the card is clicked."
};

function hnxApplyTooltips(root) {
    root.querySelectorAll("#settings_hypernetworks span, .edit-user-metadata span, .edit-user-metadata label").forEach(function(node) {
        var text = (node.textContent || "").trim();
        if (hnxTooltips[text] && !node.title) {
            node.title = hnxTooltips[text];
        }
    });
}

function hnxAddHashSort(root) {
    ["txt2img", "img2img"].forEach(function(tabname) {
        var controls = root.querySelector("#" + tabname + "_hypernetworks_controls");
        if (!controls || controls.querySelector(".hnx-sort-hash")) {
            return;
        }
        var button = document.createElement("div");
        button.className = "extra-network-control--sort hnx-sort-hash";
        button.dataset.sortkey = "hash";
        button.title = "Sort by hash";
        button.tabIndex = 0;
        button.textContent = "#";
        button.addEventListener("click", function(event) {
            extraNetworksControlSortOnClick(event, tabname, "hypernetworks");
        });
        var direction = controls.querySelector(".extra-network-control--sort-dir");
        controls.insertBefore(button, direction || null);
    });
}

onUiLoaded(function() {
    hnxAddHashSort(gradioApp());
    hnxApplyTooltips(gradioApp());
});

onAfterUiUpdate(function() {
    hnxApplyTooltips(gradioApp());
});
